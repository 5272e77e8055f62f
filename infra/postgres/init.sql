-- One-time initialisation of the shared PostgreSQL 15 server (docker-compose.yaml).
--
-- The postgres image runs this file from /docker-entrypoint-initdb.d once, on the first
-- start with an empty data directory, as POSTGRES_USER. It creates one login role and one
-- database per service so Airflow and MLflow never share credentials or tables:
--   airflow -> Airflow metadata DB (and the Celery result backend)
--   mlflow  -> MLflow tracking + model registry (+ basic-auth user tables, which use their
--              own alembic_version_auth table and do not collide with the tracking schema)
--
-- Passwords are read from the container environment with psql's \getenv (psql >= 15), so
-- no secret is written in this file. If a variable is missing, :'var' is left unexpanded,
-- the statement fails and ON_ERROR_STOP aborts the init (the container then exits non-zero).
-- Re-running needs an empty volume: `docker compose down -v` (destroys all data).

\set ON_ERROR_STOP on
\getenv airflow_db_password AIRFLOW_DB_PASSWORD
\getenv mlflow_db_password MLFLOW_DB_PASSWORD

CREATE ROLE airflow LOGIN PASSWORD :'airflow_db_password';
CREATE DATABASE airflow OWNER airflow;
REVOKE ALL ON DATABASE airflow FROM PUBLIC;

CREATE ROLE mlflow LOGIN PASSWORD :'mlflow_db_password';
CREATE DATABASE mlflow OWNER mlflow;
REVOKE ALL ON DATABASE mlflow FROM PUBLIC;
