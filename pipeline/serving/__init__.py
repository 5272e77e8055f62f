"""The scoring service: every model's ``champion`` and ``canary`` from the registry,
routed by weight.

``python -m pipeline serve --host 127.0.0.1 --port 8000`` starts it (FastAPI on uvicorn).
It serves every model spec under the models root (``models/<name>/model.yaml``; a broken
spec is logged and skipped, the others served), each with its own routing table, row
validator (its contract) and canary weight (the tag ``canary.weight`` on its registered
model). See :mod:`pipeline.serving.app` for the routes:

* Open Inference Protocol (KServe v2), per model: ``POST /v2/models/{name}/infer`` (one
  input tensor per feature column in, one output per class probability out),
  ``GET /v2/models/{name}`` (metadata), ``GET /v2/models/{name}/ready``,
  ``POST /v2/models/{name}/feedback``; ``GET /v2/health/live``, ``GET /v2/health/ready``.
* The default model's (``PIPELINE_MODEL``): ``POST /predict`` — one row (a JSON object),
  many rows (a JSON array) or ``{"rows": [...]}``; every row is checked against the data
  contract first (422 names the row and the field). A request goes to ``canary`` with
  the model's weight; with ``X-Routing-Key`` it is sticky (the key's hash picks a fixed
  bucket, so a key stays on the canary as the weight grows). ``POST /feedback`` — labels
  for earlier requests (``request_id`` → labels), which feed the labelled metric (ROC
  AUC) per alias and version. ``GET /healthz``, ``GET /readyz`` (ready only while a
  verified champion is loaded; the detail names refused versions, and lists every
  model), ``GET /metrics`` (Prometheus text; every series labelled ``model``).
* ``/admin/faults`` — the chaos switch, and ``POST /admin/poll`` (re-read the registry
  now), answered to loopback clients only; see :mod:`pipeline.serving.faults`.

A background poller (``serving_poll_seconds``) re-reads each model's aliases and weight,
loads a new version only through ``checkpoint.load_for_inference`` (digests, signature,
reload parity) and swaps that model's one immutable routing table reference: requests
in flight finish on the model they started with, none is dropped. A version that fails
verification is refused: the previous good model keeps serving, and the refusal shows
in ``/readyz`` and in ``scoring_model_refused``.

This package's ``__init__`` imports nothing heavy: ``pipeline.canary`` reads the
service's metrics through :mod:`pipeline.serving.metrics` without FastAPI or torch.
"""
