"""
### Model specs

Not a DAG: this file reports every broken model spec (`models/<name>/model.yaml`) as an
import error in the Airflow UI, naming the spec file, the field, the value and what is
allowed. The other models' `retrain_<name>` / `rollback_<name>` DAGs load as usual.
"""

from specs import spec_errors

_errors = spec_errors()
if _errors:
    raise ImportError("broken model spec(s): " + " | ".join(message for _, message in _errors))
