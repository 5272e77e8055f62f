"""Several replicas of the scoring service: the canary analysis reads every one of them,
and a label reaches the replica that scored its request.

Each replica counts only the requests it answered and holds only the scores it issued.
Behind one load-balanced address (a Kubernetes Service, ``replicas: 2``) a scrape of
``serving_url`` lands on one replica at random, so the analysis would judge a different
half of the traffic at each measurement, and a label posted there lands on a random
replica too, which does not hold the score (``unknown``). Two mechanisms fix that.

**Analysis: every replica, summed** (:class:`ReplicaSet`). Who the replicas are:

* ``PIPELINE_SERVING_METRICS_URLS`` — base URLs, comma-separated (fixed hosts, several
  compose services);
* ``PIPELINE_SERVING_REPLICAS_DNS=host:port`` — a headless Service
  (``infra/k8s/serving.yaml``, ``retrain-scoring-replicas``): every address the name
  resolves to is a replica, scraped at ``http://<address>:<port>/metrics``. Kubernetes
  lists only ready pods there, i.e. exactly the pods the Service sends traffic to. The
  name is resolved anew at each measurement. DNS rather than the Kubernetes API: the
  workers need no service account, token or RBAC rule to find the pods;
* neither: ``PIPELINE_SERVING_URL`` alone (one replica).

A measurement scrapes every replica and sums them (:func:`~pipeline.serving.metrics.
merge_snapshots`: counters and histograms add; an alias or the weight counts as applied
only once every replica applied it). A replica that does not answer fails the whole
measurement with a :class:`~pipeline.serving.metrics.MeasurementError` naming it: a
subset is never analysed as if it were the service. A window across two measurements
whose replicas differ (a pod replaced, the Deployment scaled) cannot be measured either,
like a restart (:meth:`~pipeline.serving.metrics.Snapshot.since` compares replica by
replica, which also catches one replica's reset that a sum would hide); the rollout counts
it as a measurement error and measures the next window.

**Feedback: forwarded once to the replica that scored** (:func:`forward_feedback`). With
``PIPELINE_SERVING_ADVERTISE_URL`` (its own base URL; on Kubernetes
``http://$(POD_IP):8000`` from the Downward API) a replica names itself in every request
id it issues, under the id's HMAC tag (:class:`~pipeline.serving.access.RequestIds`). A
replica receiving a label for another replica's id posts it, once, to that replica's
``/v2/models/{model}/feedback`` with the feedback token and the header
:data:`FORWARDED_HEADER`; a request carrying that header is never forwarded again (no
second hop, no loop: an item it does not hold is refused ``misrouted``). Items are
grouped by the replica that scored them; each group is all or nothing where it is
recorded, and the answer lists every refused item (``unreachable`` when its replica
could not be reached: gone, or restarted with a new address).

What makes the address safe to connect to: only the tag. Forged ids are refused before
anything is forwarded (one forged item: nothing is), the tag's key
(``PIPELINE_SERVING_REQUEST_ID_KEY``) is held by the replicas and no client (the label
feed holds the feedback token, not this key), the owner is decoded only after the tag
verified, the target is rebuilt as a bare ``http(s)://host:port``
(:func:`~pipeline.serving.access.replica_url`), the path is fixed, the model is the
service's own name for it, redirects are not followed and no proxy from the environment
is used. Nothing a client sends chooses where the service connects.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

from pipeline.errors import PipelineRejection
from pipeline.serving.metrics import MeasurementError, Snapshot, merge_snapshots, scrape

#: set on a forwarded feedback request (its value: the sender's advertised URL)
FORWARDED_HEADER = "x-pipeline-feedback-forwarded"
FORWARD_TIMEOUT_S = 5.0
FORWARD_CONNECT_TIMEOUT_S = 2.0
#: what a replica may answer about a forwarded item (anything else is ``unreachable``)
REMOTE_RESULTS = frozenset({"forged", "unknown", "duplicate", "mismatched", "misrouted"})


class ReplicaConfigError(PipelineRejection):
    """The settings that name the scoring replicas are malformed or contradict each other."""


def _dns_target(value: str) -> tuple[str, int]:
    text = value.strip()
    if "://" in text or "/" in text:
        raise ReplicaConfigError(
            f"PIPELINE_SERVING_REPLICAS_DNS={value!r} must be host:port (a headless "
            "Service's name and the pods' port, e.g. "
            "retrain-scoring-replicas.retrain.svc.cluster.local:8000), not a URL"
        )
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ReplicaConfigError(
            f"PIPELINE_SERVING_REPLICAS_DNS={value!r} must be host:port with a port in 1-65535"
        )
    return host.strip("[]"), int(port)


def _base_url(value: str, variable: str) -> str:
    url = value.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ReplicaConfigError(f"{variable}: {value!r} is not an http(s):// base URL")
    return url


@dataclass(frozen=True)
class ReplicaSet:
    """The scoring replicas one measurement reads: fixed base URLs, or every address of a
    DNS name (``dns``, resolved at each :meth:`targets`)."""

    urls: tuple[str, ...] = ()
    dns: tuple[str, int] | None = None
    source: str = "PIPELINE_SERVING_URL"

    def __post_init__(self) -> None:
        if bool(self.urls) == (self.dns is not None):
            raise ReplicaConfigError("a ReplicaSet is either base URLs or one DNS name")

    @classmethod
    def fixed(cls, urls: Iterable[str], source: str = "PIPELINE_SERVING_URL") -> ReplicaSet:
        found = tuple(dict.fromkeys(_base_url(u, source) for u in urls if u.strip()))
        if not found:
            raise ReplicaConfigError(f"{source} names no replica")
        return cls(urls=found, source=source)

    @classmethod
    def from_dns(cls, value: str) -> ReplicaSet:
        return cls(dns=_dns_target(value), source="PIPELINE_SERVING_REPLICAS_DNS")

    @classmethod
    def for_analysis(cls, service_url: str | None = None, settings: Any = None) -> ReplicaSet:
        """Who the canary analysis reads: ``service_url`` alone when one is given (the
        CLI's ``--url``, a benchmark); else ``PIPELINE_SERVING_METRICS_URLS``, or
        ``PIPELINE_SERVING_REPLICAS_DNS``, or ``PIPELINE_SERVING_URL`` (one replica)."""
        if service_url:
            return cls.fixed([service_url], "the service URL given")
        if settings is None:
            from pipeline.settings import get_settings

            settings = get_settings()
        listed = (settings.serving_metrics_urls or "").strip()
        dns = (settings.serving_replicas_dns or "").strip()
        if listed and dns:
            raise ReplicaConfigError(
                "PIPELINE_SERVING_METRICS_URLS and PIPELINE_SERVING_REPLICAS_DNS are both "
                "set: name the replicas one way (keep the DNS name on Kubernetes)"
            )
        if listed:
            return cls.fixed(listed.split(","), "PIPELINE_SERVING_METRICS_URLS")
        if dns:
            return cls.from_dns(dns)
        return cls.fixed([settings.serving_url], "PIPELINE_SERVING_URL")

    def describe(self) -> str:
        if self.dns is not None:
            return f"every address of {self.dns[0]}:{self.dns[1]} ({self.source})"
        return f"{', '.join(self.urls)} ({self.source})"

    def targets(self) -> list[str]:
        """Each replica's base URL, now. MeasurementError when a DNS name has no address."""
        if self.dns is None:
            return list(self.urls)
        host, port = self.dns
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            raise MeasurementError(
                f"{self.source}: {host} does not resolve ({exc}): no scoring replica found"
            ) from None
        addresses = sorted({str(info[4][0]) for info in infos})
        if not addresses:
            raise MeasurementError(f"{self.source}: {host} has no address: no replica is ready")
        return [f"http://[{a}]:{port}" if ":" in a else f"http://{a}:{port}" for a in addresses]

    def scrape(
        self, *, client: Any = None, timeout: float = 5.0, model: str | None = None
    ) -> Snapshot:
        """Every replica's ``/metrics``, summed (:func:`merge_snapshots`); one replica that
        does not answer is a MeasurementError for the whole measurement."""
        targets = self.targets()
        parts: dict[str, Snapshot] = {}
        for url in targets:
            try:
                parts[url] = scrape(url, timeout=timeout, client=client, model=model)
            except MeasurementError as exc:
                raise MeasurementError(
                    f"scoring replica {url} could not be measured ({len(parts)} of "
                    f"{len(targets)} replicas of {self.describe()} read before it; a "
                    f"measurement reads all or none): {exc}"
                ) from None
        return merge_snapshots(parts)


# -- feedback forwarding (the receiving side is pipeline/serving/app.py) ----------------------


def forward_client() -> Any:
    """The HTTP client forwards go through: short timeouts, no redirects followed, no proxy
    taken from the environment (a bearer token goes only to the replica named)."""
    import httpx

    return httpx.AsyncClient(
        timeout=httpx.Timeout(FORWARD_TIMEOUT_S, connect=FORWARD_CONNECT_TIMEOUT_S),
        follow_redirects=False,
        trust_env=False,
    )


async def forward_feedback(
    client: Any,
    owner: str,
    model: str,
    items: list[tuple[str, list[Any]]],
    *,
    token: str,
    sender: str,
) -> tuple[dict[str, int], list[tuple[int, str, str]]]:
    """Post ``items`` (request id, labels) once to ``owner``'s feedback route for
    ``model``: (the owner's counts, refusals ``(index in items, result, message)``). An
    owner that cannot be reached, or answers anything but its feedback answer, refuses
    every item as ``unreachable``. ``owner`` must come from a verified request id."""
    import httpx

    url = f"{owner}/v2/models/{quote(model, safe='')}/feedback"
    body = {"feedback": [{"request_id": rid, "labels": labels} for rid, labels in items]}
    headers = {"Authorization": f"Bearer {token}", FORWARDED_HEADER: sender}

    def unreachable(why: str) -> tuple[dict[str, int], list[tuple[int, str, str]]]:
        msg = f"the replica that scored it, {owner}, {why}; send its label again later"
        return {}, [(i, "unreachable", msg) for i in range(len(items))]

    try:
        resp = await client.post(url, json=body, headers=headers)
    except httpx.HTTPError as exc:
        return unreachable(f"could not be reached ({type(exc).__name__}: {exc})")
    try:
        answer = resp.json()
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        return unreachable(f"answered {resp.status_code} without a feedback answer")
    counts = {
        k: int(v)
        for k, v in answer.items()
        if k in ("matched", "unknown", "mismatched", *REMOTE_RESULTS) and isinstance(v, int)
    }
    if resp.status_code == 200:
        return counts, []
    refused: list[tuple[int, str, str]] = []
    for r in answer.get("refused") or []:
        idx = r.get("index") if isinstance(r, dict) else None
        result = r.get("result") if isinstance(r, dict) else None
        if isinstance(idx, int) and 0 <= idx < len(items) and result in REMOTE_RESULTS:
            refused.append((idx, str(result), f"at {owner}: {str(r.get('message'))[:300]}"))
    if not refused:
        return unreachable(
            f"answered {resp.status_code}: {str(answer.get('error') or answer)[:300]}"
        )
    return counts, refused
