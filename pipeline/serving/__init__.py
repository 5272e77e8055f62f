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
  for earlier requests (the ``request_id`` the service issued → labels; bearer
  ``PIPELINE_SERVING_FEEDBACK_TOKEN``; each id once), which feed the labelled metric (ROC
  AUC) per alias and version. ``GET /healthz``, ``GET /readyz`` (ready only while a
  verified champion is loaded; the detail names refused versions, and lists every
  model), ``GET /metrics`` (Prometheus text; every series labelled ``model``).
* ``/admin/faults`` — the chaos switch, and ``POST /admin/poll`` (re-read the registry
  now): off unless ``PIPELINE_SERVING_ADMIN_ENABLED=true``, then only with bearer
  ``PIPELINE_SERVING_ADMIN_TOKEN``; see :mod:`pipeline.serving.faults` and
  :mod:`pipeline.serving.access` (tokens, body limit, why no client address is trusted).

A background poller (``serving_poll_seconds``) re-reads each model's aliases and weight,
loads a new version only if the gate allowed it (not tagged ``rejected`` or
``rolled_back``, ``gate.verdict=promote``, the manifest digest recorded at registration,
the spec's factory from git) and its checkpoint verifies (digests, signature, reload
parity), and swaps that model's one immutable routing table reference: requests in
flight finish on the model they started with, none is dropped. A refused version never
takes traffic: the previous good model keeps serving, and the refusal shows in
``/readyz`` (with its reason) and in ``scoring_refusals_total`` /
``scoring_model_refused``. See :mod:`pipeline.serving.service`.

Several replicas (:mod:`pipeline.serving.replicas`): the canary analysis reads and sums
every replica's ``/metrics`` (``PIPELINE_SERVING_METRICS_URLS`` or a headless Service's
DNS name, ``PIPELINE_SERVING_REPLICAS_DNS``), and each replica names itself in the
request ids it issues (``PIPELINE_SERVING_ADVERTISE_URL``, under the ids' HMAC tag) so a
label posted to another replica is forwarded once to the one that scored it.

At start the service refuses unsafe access settings and bad signing keys, or a private
key (``app.startup_checks``: ``signing.verifier_startup_check(serving=True)``).

The request path pays for what it scores, not for a fixed setup per request: a body
whose numbers cannot be out of range is parsed by the C scanner alone
(``schema.parse_json``), valid rows are confirmed column by column and walked cell by
cell only when they break the contract (``schema.RowValidator``), the checkpoint's
featurisation runs on the JSON rows without a DataFrame (:mod:`pipeline.serving.encode`,
used only where it equals ``features.transform`` on probe rows), and a request's scores
update the score histogram once per bucket (``metrics.observe_many``).
``benchmarks/serving_vs_mlflow.py`` measures the result against ``mlflow models serve``.

This package's ``__init__`` imports nothing heavy: ``pipeline.canary`` reads the
service's metrics through :mod:`pipeline.serving.metrics` without FastAPI or torch.
"""
