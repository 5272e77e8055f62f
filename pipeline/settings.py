"""One typed settings object, read lazily from the environment.

Every value has an embedded default that keeps all state under ``PIPELINE_HOME``
(``./.local`` unless set): storage in a local folder, MLflow on SQLite with a
local artifact folder. Point the same code at S3 and an MLflow server by setting
``PIPELINE_STORAGE_URI=s3://bucket/prefix`` and ``PIPELINE_MLFLOW_TRACKING_URI``.
Nothing here touches the file system or network on import.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PIPELINE_", extra="ignore")

    home: Path = Field(default=Path(".local"), description="Root of all embedded state.")
    storage_uri: str = Field(default="", description="file:// or s3:// root for data objects.")
    s3_endpoint_url: str | None = Field(default=None, description="S3 API endpoint (MinIO, moto).")
    s3_connect_timeout_s: float = Field(
        default=10.0, gt=0, description="S3 connect timeout, seconds (then botocore retries)."
    )
    s3_read_timeout_s: float = Field(
        default=60.0, gt=0, description="S3 read timeout, seconds, per socket read."
    )
    mlflow_tracking_uri: str = Field(default="", description="MLflow tracking/registry URI.")
    mlflow_artifact_uri: str = Field(default="", description="Artifact root for new experiments.")
    models_root: Path = Field(
        default=PROJECT_ROOT / "models",
        description="Folder of model specs: one <name>/model.yaml per model (pipeline/spec.py).",
    )
    model: str = Field(
        default="card_fraud",
        description="The model a command or task acts on when none is named (--spec / --model).",
    )
    # -- checkpoint signatures (pipeline/signing.py): Ed25519, private key with the trainer --
    signing_key: SecretStr | None = Field(
        default=None,
        description="Ed25519 private key (PEM text or its base64 body) that signs checkpoint "
        "manifests: the trainer only. Unset with no keyring: a local pair under home/keys.",
    )
    signing_key_id: str = Field(
        default="",
        description="Key id written into each signature (default: ed25519-<fingerprint>).",
    )
    signing_public_keys: str | None = Field(
        default=None,
        description="Trusted public keys: inline ID=BASE64[,ID=BASE64] or a path (a folder "
        "of ID.pub files, or a file of ID=BASE64 lines). Unset: the signer's own key.",
    )
    signing_legacy_hmac_key: SecretStr | None = Field(
        default=None,
        description="Off unless set: also accept HMAC-SHA256 signatures made with this old "
        "key (checkpoints from before Ed25519) until `checkpoint resign` re-signs them.",
    )
    device: str = Field(default="auto", description="auto | cpu | cuda | cuda:N | mps")
    train_processes: int = Field(
        default=1,
        ge=1,
        le=64,
        description="train_model processes: >1 launches torchrun "
        "(DistributedDataParallel; one GPU each on CUDA, e.g. the pod's nvidia.com/gpu count)",
    )
    # -- where train_model runs (read at DAG-parse time by dags/placement.py) --
    execution_mode: Literal["auto", "inprocess", "celery", "kubernetes"] = Field(
        default="auto",
        description="auto: queue `gpu` only under Celery | inprocess | celery | "
        "kubernetes (GPU pod via executor_config)",
    )
    k8s_pod_template_file: str = Field(
        default="",
        description="Pod template for kubernetes mode "
        "(default: infra/k8s/training-pod-template.yaml)",
    )
    mlflow_ui_url: str = Field(
        default="http://127.0.0.1:5000", description="Base URL of the MLflow UI, for links."
    )
    # -- Airflow's REST API, for `python -m pipeline data land` (asset events) --
    airflow_api_url: str = Field(
        default="http://127.0.0.1:8080", description="Airflow API server base URL (no /api/v2)."
    )
    airflow_username: str = Field(default="", description="User for POST /auth/token.")
    airflow_password: SecretStr | None = Field(default=None, description="Its password.")
    airflow_token: SecretStr | None = Field(
        default=None, description="A JWT access token, instead of username/password."
    )
    # -- scoring service and canary (pipeline/serving, pipeline/canary/) --
    serving_url: str = Field(
        default="http://127.0.0.1:8000",
        description="Base URL of the scoring service; the canary analysis reads its /metrics.",
    )
    serving_poll_seconds: float = Field(
        default=2.0,
        gt=0,
        description="How often the service re-reads aliases and the canary weight.",
    )
    serving_admin_enabled: bool = Field(
        default=False,
        description="The /admin/* routes (fault switch, poll now); off: 404. On, they need "
        "serving_admin_token (the service refuses to start without a strong one).",
    )
    serving_admin_token: SecretStr | None = Field(
        default=None,
        description="Bearer token for /admin/* (at least 32 characters: openssl rand -hex 32).",
    )
    serving_feedback_token: SecretStr | None = Field(
        default=None,
        description="Bearer token for the /feedback routes (unset: feedback is refused, 403); "
        "the replayer sends it with the labels.",
    )
    serving_max_body_bytes: int = Field(
        default=1 << 20,
        ge=1024,
        le=1 << 30,
        description="Largest request body the service reads (413 beyond, before parsing).",
    )
    # -- several replicas of the scoring service (pipeline/serving/replicas.py) --
    serving_metrics_urls: str = Field(
        default="",
        description="Base URLs of EVERY scoring replica, comma-separated: the canary "
        "analysis reads and sums all of them (empty: serving_url alone).",
    )
    serving_replicas_dns: str = Field(
        default="",
        description="host:port of a headless Service: every address it resolves to is a "
        "replica the canary analysis reads (re-resolved at each measurement).",
    )
    serving_advertise_url: str = Field(
        default="",
        description="This replica's own base URL (e.g. http://$(POD_IP):8000): named in the "
        "request ids it issues, so feedback reaching another replica is forwarded here.",
    )
    serving_request_id_key: SecretStr | None = Field(
        default=None,
        description="HMAC key of the request ids, the same on every replica and held by no "
        "client (needed with serving_advertise_url; unset: derived from the feedback token).",
    )
    canary_steps: list[float] = Field(
        default=[0.05, 0.25, 0.5, 1.0], description="Canary traffic weights, in order."
    )
    canary_step_seconds: float = Field(default=300.0, gt=0, description="Time at each weight.")
    canary_analysis_interval_seconds: float = Field(
        default=60.0, gt=0, description="Time between canary measurements."
    )
    canary_bake_seconds: float = Field(
        default=600.0,
        ge=0,
        description="After full promotion, how long the new champion is "
        "compared with the previous one's recorded behaviour (0: no bake).",
    )

    @property
    def home_dir(self) -> Path:
        return self.home.expanduser().resolve()

    @property
    def storage_root(self) -> str:
        if self.storage_uri:
            return self.storage_uri.rstrip("/")
        return "file://" + str(self.home_dir / "storage")  # as pipeline.storage reads it back

    @property
    def tracking_uri(self) -> str:
        if self.mlflow_tracking_uri:
            return self.mlflow_tracking_uri
        return f"sqlite:///{self.home_dir / 'mlflow' / 'mlflow.db'}"

    @property
    def artifact_root(self) -> str:
        if self.mlflow_artifact_uri:
            return self.mlflow_artifact_uri
        return (self.home_dir / "mlflow" / "artifacts").as_uri()

    def resolve(self, location: str) -> str:
        """A spec location: a URI (``s3://``, ``file://``) or absolute path as given, else a
        path relative to the storage root."""
        if "://" in location:
            return location
        if location.startswith("/"):
            return "file://" + str(Path(location))
        return f"{self.storage_root}/{location.strip('/')}"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
