"""Several replicas of the scoring service (issue 14, point 6): the canary analysis reads
every replica and sums them, and feedback reaches the replica that scored.

Two real uvicorn servers on two ports of 127.0.0.1 (in threads of this process), each with
its own service, metrics and pending scores, talking real HTTP to each other; nothing is
mocked. A plain listening socket stands in for "an address a forged id names", so the tests
can see whether the service ever connected to it.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx
import pytest
import torch

from pipeline.canary.analysis import CanaryPlan, CanaryReason
from pipeline.data.generate import WorldSpec, generate
from pipeline.serving import traffic
from pipeline.serving.access import AccessPolicy, RequestIds, ServingConfigError
from pipeline.serving.app import create_app
from pipeline.serving.metrics import MeasurementError, Snapshot, VersionStats, merge_snapshots
from pipeline.serving.replicas import FORWARDED_HEADER, ReplicaConfigError, ReplicaSet
from pipeline.serving.schema import RowValidator
from pipeline.serving.service import LoadedModel, ModelRefused, ScoringService, ServedModel
from pipeline.train.features import fit_features
from pipeline.train.model import MLP, ModelConfig
from tests.integration.moto import free_port
from tests.unit._serving import Servers

FRAUD = "card_fraud"
FEEDBACK_TOKEN = "feedback-" + "f2" * 20
REQUEST_ID_KEY = "request-ids-" + "9c" * 20
FEEDBACK = {"Authorization": f"Bearer {FEEDBACK_TOKEN}"}


@dataclass
class Replica:
    url: str
    service: ScoringService
    rows: list[dict]


def _service(contract, state: traffic.ServingState, refuse: frozenset[str] = frozenset()):
    df = generate(WorldSpec(rows=1500, seed=5))
    features = fit_features(df, contract)
    torch.manual_seed(1)
    model = MLP(ModelConfig(features.width, len(features.classes))).eval()

    def load(v: str) -> LoadedModel:
        if v in refuse:
            raise ModelRefused(f"v{v}: signature does not verify")
        return LoadedModel(v, f"file:///ckpt/{v}", "ab" * 32, model, features, 1)

    served = ServedModel(
        FRAUD,
        validator=RowValidator(contract),
        loader=load,
        read_state=lambda: state,
        registered_model="card-fraud",
    )
    service = ScoringService([served], default=FRAUD, poll_seconds=60)
    service.poll_once()
    part = df.head(16)[features.input_columns]
    rows = part.astype(object).where(part.notna(), None).to_dict(orient="records")
    return service, rows


@pytest.fixture
def replicas(contract) -> Iterator[Callable[..., Replica]]:
    """Start replicas: ``start(advertise=True, state=..., refuse=...)`` -> Replica."""
    servers = Servers()

    def start(
        advertise: bool = True,
        state: traffic.ServingState | None = None,
        refuse: frozenset[str] = frozenset(),
    ) -> Replica:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        service, rows = _service(contract, state or traffic.ServingState("1", None, 0.0), refuse)
        access = AccessPolicy(
            feedback_token=FEEDBACK_TOKEN,
            advertise_url=url if advertise else None,
            request_id_key=REQUEST_ID_KEY if advertise else None,
        )
        servers.start(create_app(service, access=access, poll=False), port=port)
        return Replica(url, service, rows)

    yield start
    servers.stop()


class Listener:
    """A TCP port that counts the connections made to it (closing each at once)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def listener() -> Iterator[Listener]:
    lst = Listener()
    yield lst
    lst.close()


def _score(replica: Replica, n: int = 1) -> list[str]:
    ids = []
    with httpx.Client(base_url=replica.url, timeout=10, trust_env=False) as http:
        for i in range(n):
            r = http.post("/predict", json=replica.rows[i % len(replica.rows)])
            assert r.status_code == 200, r.text
            ids.append(r.json()["request_id"])
    return ids


def _feedback(replica: Replica, items, headers=None) -> httpx.Response:
    with httpx.Client(base_url=replica.url, timeout=20, trust_env=False) as http:
        return http.post(
            "/feedback",
            json={"feedback": [{"request_id": rid, "label": label} for rid, label in items]},
            headers={**FEEDBACK, **(headers or {})},
        )


def _labelled(replica: Replica) -> float:
    snap = ReplicaSet.fixed([replica.url]).scrape(model=FRAUD)
    st = snap.stats("1")
    return st.labelled_pos.total + st.labelled_neg.total


def _feedback_total(replica: Replica, result: str) -> float:
    text = httpx.get(replica.url + "/metrics", timeout=10, trust_env=False).text
    for line in text.splitlines():
        if line.startswith(f'scoring_feedback_total{{model="{FRAUD}",result="{result}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# -- the analysis reads every replica ----------------------------------------------------------


def test_the_analysis_sums_every_replica_and_fails_when_one_does_not_answer(replicas):
    from pipeline.settings import Settings

    a, b = replicas(), replicas()
    both = ReplicaSet.for_analysis(settings=Settings(serving_metrics_urls=f"{a.url}, {b.url}/"))
    assert both.targets() == [a.url, b.url]
    before = both.scrape(model=FRAUD)
    _score(a, 3)
    _score(b, 5)
    after = both.scrape(model=FRAUD)
    window = after.since(before, "1")
    assert window.requests == 8 and window.rows == 8
    assert window.score.total == 8 and window.latency.total == 8
    assert after.serving == {"champion": "1"}
    # one scrape of one replica sees only its own share (what the shipped config did)
    assert ReplicaSet.fixed([b.url]).scrape(model=FRAUD).stats("1").requests == 5
    # DNS names the replicas too: every address of the name is one
    assert ReplicaSet.from_dns(a.url.removeprefix("http://")).targets() == [a.url]
    # a replica that does not answer fails the whole measurement, naming it
    gone = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(
        MeasurementError, match=f"replica {gone} could not be measured.*all or none"
    ):
        ReplicaSet.fixed([a.url, gone]).scrape(model=FRAUD)


def test_a_canary_counts_as_loaded_only_when_every_replica_loaded_it(replicas):
    from pipeline.canary import rollout

    a = replicas(state=traffic.ServingState("1", "2", 0.25))
    b = replicas(state=traffic.ServingState("1", None, 0.0))  # still on its previous poll
    snap = ReplicaSet.fixed([a.url, b.url]).scrape(model=FRAUD)
    assert snap.serving == {"champion": "1"} and snap.canary_weight is None
    # a version refused by any replica stops the canary, pointing at /readyz's reason
    c = replicas(state=traffic.ServingState("1", "2", 0.25), refuse=frozenset({"2"}))
    ro = rollout._Rollout(
        "2", "1", CanaryPlan(), a.url, "t", "me", replicas=ReplicaSet.fixed([a.url, c.url])
    )
    try:
        with pytest.raises(rollout._Stop) as stop:
            ro._scrape()
    finally:
        ro.http.close()
    assert stop.value.reason is CanaryReason.CANARY_REFUSED
    assert stop.value.message == (
        "the scoring service refused v2 (see /readyz `refusals` for the reason)"
    )


def _snap(requests: dict[str, float]) -> Snapshot:
    return Snapshot(
        {"1": VersionStats(requests=requests["1"])},
        {"champion": "1"},
        0.0,
        frozenset(),
        frozenset(),
    )


def test_a_window_across_a_restarted_or_replaced_replica_is_not_measured():
    a, b = "http://10.0.0.1:8000", "http://10.0.0.2:8000"
    t0 = merge_snapshots({a: _snap({"1": 10}), b: _snap({"1": 10})})
    fine = merge_snapshots({a: _snap({"1": 30}), b: _snap({"1": 12})})
    assert fine.stats("1").requests == 42 and fine.since(t0, "1").requests == 22
    # b restarted (10 -> 2) while a grew: the sum (20 -> 32) hides it; per replica it shows
    reset = merge_snapshots({a: _snap({"1": 30}), b: _snap({"1": 2})})
    with pytest.raises(MeasurementError, match=f"replica {b}: a counter went backwards"):
        reset.since(t0, "1")
    # b replaced by c (a rolling update): the two measurements are not of the same replicas
    c = "http://10.0.0.3:8000"
    moved = merge_snapshots({a: _snap({"1": 30}), c: _snap({"1": 1})})
    with pytest.raises(MeasurementError, match=r"replicas changed.*gone: \['http://10.0.0.2"):
        moved.since(t0, "1")


@pytest.mark.parametrize(
    ("kw", "words"),
    [
        ({"serving_replicas_dns": "http://scoring:8000"}, "must be host:port"),
        ({"serving_replicas_dns": "scoring"}, "must be host:port"),
        ({"serving_metrics_urls": "scoring:8000"}, "not an http"),
        ({"serving_metrics_urls": "http://a:1", "serving_replicas_dns": "b:2"}, "both"),
    ],
)
def test_replica_settings_that_cannot_be_right_are_refused(kw, words):
    from pipeline.settings import Settings

    with pytest.raises(ReplicaConfigError, match=words):
        ReplicaSet.for_analysis(settings=Settings(**kw))


def test_an_explicit_service_url_and_the_default_name_one_replica():
    from pipeline.settings import Settings

    dns = Settings(serving_replicas_dns="scoring-replicas:8000")
    assert ReplicaSet.for_analysis("http://x:1", settings=dns).targets() == ["http://x:1"]
    assert ReplicaSet.for_analysis(settings=dns).dns == ("scoring-replicas", 8000)
    assert ReplicaSet.for_analysis(settings=Settings()).targets() == ["http://127.0.0.1:8000"]


# -- feedback reaches the replica that scored -------------------------------------------------


def test_feedback_posted_to_replica_b_for_an_id_issued_by_a_reaches_a(replicas):
    a, b = replicas(), replicas()
    rid = _score(a)[0]
    assert RequestIds(REQUEST_ID_KEY).verify(rid).owner == a.url
    r = _feedback(b, [(rid, 1)])
    assert r.status_code == 200, r.text
    assert r.json() == {"matched": 1, "unknown": 0, "mismatched": 0, "forwarded": 1}
    assert _labelled(a) == 1 and _labelled(b) == 0
    assert _feedback_total(b, "forwarded") == 1 and _feedback_total(a, "matched") == 1
    # the owner's answer comes back: a second label is refused as a duplicate, at a
    again = _feedback(b, [(rid, 0)])
    assert again.status_code == 409, again.text
    assert again.json()["refused"][0]["result"] == "duplicate"
    assert again.json()["refused"][0]["message"].startswith(f"at {a.url}:")
    # a batch of both replicas' ids is recorded where each was scored
    ids_a, ids_b = _score(a, 2), _score(b, 3)
    mixed = [(i, 1) for i in ids_a] + [(i, 0) for i in ids_b]
    r = _feedback(b, mixed)
    assert r.status_code == 200, r.text
    assert r.json() == {"matched": 5, "unknown": 0, "mismatched": 0, "forwarded": 2}
    assert _labelled(a) == 3 and _labelled(b) == 3


def test_a_forged_id_naming_another_address_is_refused_without_any_connection(replicas, listener):
    a, b = replicas(), replicas()
    real = _score(a)[0]
    forged = [
        # tagged with some other key
        RequestIds("another-service-" + "k" * 32, owner=listener.url).issue(),
        # tagged with the feedback token: what a label feed holding it could compute
        RequestIds(FEEDBACK_TOKEN, owner=listener.url).issue(),
        # a real id whose owner was swapped for the listener's, keeping the tag
        real.split(".")[0]
        + "."
        + RequestIds(REQUEST_ID_KEY, owner=listener.url).issue().split(".")[1]
        + "."
        + real.split(".")[2],
    ]
    for rid in forged:
        r = _feedback(b, [(rid, 1)])
        assert r.status_code == 404, r.text
        assert r.json()["refused"][0]["result"] == "forged"
    # one forged item in a batch: nothing recorded, nothing forwarded, not even the real one
    r = _feedback(b, [(real, 1), (forged[0], 1)])
    assert r.status_code == 404 and [i["index"] for i in r.json()["refused"]] == [1]
    assert listener.connections == 0
    assert _labelled(a) == 0 and _feedback_total(b, "forwarded") == 0


def test_a_forwarded_label_is_never_forwarded_again(replicas, listener):
    b = replicas()
    # an id a replica at the listener's address really issued (the replicas' key)
    rid = RequestIds(REQUEST_ID_KEY, owner=listener.url).issue()
    r = _feedback(b, [(rid, 1)], headers={FORWARDED_HEADER: "http://127.0.0.1:1"})
    assert r.status_code == 421, r.text
    assert r.json()["refused"][0]["result"] == "misrouted"
    assert listener.connections == 0
    # not forwarded before: one hop to the replica the id names, which does not answer HTTP
    r = _feedback(b, [(rid, 1)])
    assert r.status_code == 502, r.text
    item = r.json()["refused"][0]
    assert item["result"] == "unreachable" and listener.url in item["message"]
    assert listener.connections == 1
    assert _feedback_total(b, "unreachable") == 1


def test_a_service_without_an_address_of_its_own_forwards_nothing(replicas, listener):
    solo = replicas(advertise=False)
    rid = _score(solo)[0]
    assert rid.count(".") == 1 and RequestIds(FEEDBACK_TOKEN).verify(rid).owner is None
    assert _feedback(solo, [(rid, 1)]).json()["matched"] == 1


def test_request_ids_name_their_replica_under_the_tag():
    ids = RequestIds(REQUEST_ID_KEY, owner="http://10.1.2.3:8000/")
    rid = ids.issue()
    assert ids.verify(rid).owner == "http://10.1.2.3:8000"
    assert RequestIds(REQUEST_ID_KEY).verify(rid).owner == "http://10.1.2.3:8000"
    assert RequestIds(FEEDBACK_TOKEN).verify(rid) is None
    nonce, owner, tag = rid.split(".")
    assert ids.verify(f"{nonce}.{tag}") is None  # the owner is covered by the tag
    assert ids.verify(f"{nonce}.{owner}x.{tag}") is None


@pytest.mark.parametrize(
    ("kw", "words"),
    [
        ({"advertise_url": "http://10.0.0.1:8000"}, "needs PIPELINE_SERVING_REQUEST_ID_KEY"),
        (
            {"advertise_url": "http://10.0.0.1:8000", "request_id_key": FEEDBACK_TOKEN},
            "must differ",
        ),
        ({"request_id_key": "short"}, "fewer than 32"),
        (
            {"advertise_url": "http://u:p@10.0.0.1:8000", "request_id_key": REQUEST_ID_KEY},
            "bare",
        ),
        (
            {"advertise_url": "http://10.0.0.1:8000/x", "request_id_key": REQUEST_ID_KEY},
            "bare",
        ),
        ({"advertise_url": "10.0.0.1:8000", "request_id_key": REQUEST_ID_KEY}, "http"),
    ],
)
def test_replica_access_settings_that_are_unsafe_are_refused_at_start(kw, words):
    with pytest.raises(ServingConfigError, match=words):
        AccessPolicy(feedback_token=FEEDBACK_TOKEN, **kw)
