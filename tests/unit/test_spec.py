"""Model specs: a bad spec is refused naming file, field, value and what is allowed; the factory
contract; runs may only tighten the policy; nothing in the code names a dataset's column."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from pipeline import spec as specs
from pipeline.train.model import FactoryError, ModelInputs, ModelRef, build_model, check_factory

ROOT = Path(__file__).resolve().parents[2]
CARD = ROOT / "models" / "card_fraud"

GOOD_NET = """
from torch import nn


def build(inputs, width=8):
    return nn.Sequential(nn.Linear(inputs.input_width, width), nn.ReLU(),
                         nn.Linear(width, inputs.num_classes))
"""


def write_spec(
    folder: Path, text: str, *, contract: Path = CARD / "contract.yaml", module: str | None = None
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "contract.yaml").write_text(contract.read_text())
    if module is not None:
        (folder / "net.py").write_text(module)
    (folder / "model.yaml").write_text(text)
    return folder / "model.yaml"


def test_the_smallest_spec_is_two_lines_and_everything_else_defaults(tmp_path):
    s = specs.load_spec(
        write_spec(tmp_path / "tiny_model", "contract: contract.yaml\ntask: binary\n")
    )
    assert s.name == "tiny_model" and s.model_name == "tiny-model"
    assert s.model.factory == "pipeline.train.model:mlp" and s.primary_metric == "roc_auc"
    assert s.gate.slices == [] and s.gate.require_approval is False and s.canary.enabled is False
    assert (
        s.landing_prefix == "landing/tiny_model"
        and s.eval_location == "trusted/tiny_model/eval.parquet"
    )
    assert s.schedule.cron is None and s.schedule.asset is True
    assert s.overrides.allow == []
    assert isinstance(check_factory(s), nn.Module)


@pytest.mark.parametrize(
    ("body", "module", "fragments"),
    [
        (
            "contract: contract.yaml\ntask: binary\ngate: {margn: 0.1}\n",
            None,
            ["unknown field", "gate.margn", "did you mean 'margin'", "fields allowed here"],
        ),
        ("task: binary\n", None, ["'contract' is required"]),
        ("contract: nowhere.yaml\ntask: binary\n", None, ["'contract'", "nowhere.yaml", "no file"]),
        (
            "contract: contract.yaml\ntask: regression\n",
            None,
            ["task", "'regression'", "binary", "multiclass"],
        ),
        (
            "contract: contract.yaml\ntask: multiclass\n",
            None,
            ["'task' = 'multiclass'", "2 values", "binary"],
        ),
        (
            "contract: contract.yaml\ntask: binary\nmetrics: {primary: f1}\n",
            None,
            ["metrics.primary", "'f1'", "allowed"],
        ),
        (
            "contract: contract.yaml\ntask: binary\nmetrics: {primary: pr_auc}\n",
            None,
            ["pr_auc", "paired bootstrap", "allowed"],
        ),
        (
            "contract: contract.yaml\ntask: binary\ngate: {slices: [amount]}\n",
            None,
            ["gate.slices", "'amount'", "not a categorical feature", "allowed"],
        ),
        (
            "contract: contract.yaml\ntask: binary\ngate: {margin: -1}\n",
            None,
            ["gate.margin", "-1"],
        ),
        (
            "contract: contract.yaml\ntask: binary\nmodel: {factory: not-a-ref}\n",
            None,
            ["model.factory", "not-a-ref"],
        ),
        (
            "contract: contract.yaml\ntask: binary\nmodel: {factory: 'nosuchmodule_xyz:build'}\n",
            None,
            ["model.factory", "nosuchmodule_xyz", "neither a file next to the spec"],
        ),
        (
            "contract: contract.yaml\ntask: binary\noverrides: {allow: [gate.everything]}\n",
            None,
            ["overrides.allow", "gate.everything"],
        ),
        ("name: Bad-Name\ncontract: contract.yaml\ntask: binary\n", None, ["'name'", "Bad-Name"]),
        ("[1, 2]\n", None, ["a mapping of fields"]),
        (
            "contract: contract.yaml\ntask: binary\ntraining: {max_epochs: 0}\n",
            None,
            ["training.max_epochs", "0"],
        ),
    ],
)
def test_a_bad_spec_names_file_field_value_and_what_is_allowed(tmp_path, body, module, fragments):
    path = write_spec(tmp_path / "m", body, module=module)
    with pytest.raises(specs.SpecError) as err:
        specs.load_spec(path)
    message = str(err.value)
    assert str(path) in message
    for f in fragments:
        assert f in message, message


@pytest.mark.parametrize(
    ("module", "kwargs", "fragments"),
    [
        ("raise ImportError('no such thing')\n", "{}", ["importing", "no such thing"]),
        (
            "def build(inputs):\n    return 'a string'\n",
            "{}",
            ["returned str", "not a torch.nn.Module"],
        ),
        (
            "from torch import nn\n\ndef build(inputs):\n    return nn.Linear(inputs.input_width, 7)\n",
            "{}",
            ["output (2, 7)", "(2, 2) logits"],
        ),
        (
            "from torch import nn\n\ndef build(inputs):\n    return nn.Linear(3, inputs.num_classes)\n",
            "{}",
            ["forward on a (2,", "failed"],
        ),
        (GOOD_NET, "{depth: 3}", ["kwargs", "depth"]),
        ("x = 1\n", "{}", ["has no callable 'build'"]),
    ],
)
def test_a_factory_that_breaks_the_contract_is_refused_before_any_data(
    tmp_path, module, kwargs, fragments
):
    path = write_spec(
        tmp_path / "m",
        f"contract: contract.yaml\ntask: binary\n"
        f"model: {{factory: 'net:build', kwargs: {kwargs}}}\n",
        module=module,
    )
    s = specs.load_spec(path)  # cheap checks pass: the module file exists
    with pytest.raises(FactoryError) as err:
        check_factory(s)
    for f in [str(path), "model", *fragments]:
        assert f in str(err.value), str(err.value)
    out = subprocess.run(
        [sys.executable, "-m", "pipeline", "spec", "check", str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert out.returncode == 1 and out.stdout.startswith("FAIL "), out.stdout + out.stderr


def test_the_factory_gets_what_the_data_gives_and_its_code_is_pinned_by_digest(tmp_path):
    from pipeline.train.features import FeatureSpec
    from pipeline.train.model import file_sha256

    path = write_spec(
        tmp_path / "m",
        "contract: contract.yaml\ntask: binary\n"
        "model: {factory: 'net:build', kwargs: {width: 5}}\n",
        module=GOOD_NET,
    )
    s = specs.load_spec(path)
    fs = FeatureSpec(
        ["a", "b"], [0.0, 0.0], [1.0, 1.0], [], [("c", ["x", "y", "z"])], "t", [0, 1, 2]
    )
    inputs = ModelInputs(fs.width, 3, fs, "multiclass")
    assert inputs.layout == [("a", 0, 2), ("b", 2, 2), ("c", 4, 4)] and fs.width == 8
    code = s.factory_module_file
    ref = ModelRef("net:build", {"width": 5}, file_sha256(code))
    model = build_model(ref, inputs, code)
    assert model(torch.zeros(4, 8)).shape == (4, 3)
    with pytest.raises(FactoryError, match="the model's code changed"):
        build_model(ModelRef("net:build", {}, "0" * 64), inputs, code)


# -- the policy: defaults and bounds from the spec; a run may only tighten it ----------------------


@pytest.fixture(scope="module")
def card():
    return specs.get_spec("card_fraud")


@pytest.mark.parametrize(
    ("requested", "field", "value"),
    [
        ({"gate_floor": 0.8}, "floor", 0.8),
        ({"gate_margin": 0.02}, "margin", 0.02),
        ({"gate_slices": ["channel", "country"]}, "slices", ("channel", "country")),
        ({"gate_max_checkpoint_mb": 10}, "max_checkpoint_mb", 10),
        ({"gate_max_latency_p95_ms": 100}, "max_latency_p95_ms", 100),
        ({"require_approval": True}, "require_approval", True),
        ({"decay_margin": 0.01}, "decay_margin", 0.01),
        ({"canary": True}, "canary", True),
        ({"gate_floor": 0.7}, "floor", 0.7),  # the spec's own value: no override recorded
    ],
)
def test_tightening_is_accepted_and_recorded(card, requested, field, value):
    policy = specs.resolve_policy(card, requested)
    assert getattr(policy, field) == value
    kinds = [o["kind"] for o in policy.overrides]
    assert kinds == ([] if requested == {"gate_floor": 0.7} else ["tighten"])


@pytest.mark.parametrize(
    ("requested", "param"),
    [
        ({"gate_floor": 0.5}, "gate_floor"),
        ({"gate_margin": 0.0}, "gate_margin"),
        ({"gate_slices": []}, "gate_slices"),
        ({"gate_max_checkpoint_mb": 500}, "gate_max_checkpoint_mb"),
        ({"gate_max_latency_p95_ms": None}, None),  # None keeps the spec's budget
        ({"decay_margin": 0.3}, "decay_margin"),
    ],
)
def test_loosening_is_refused_naming_the_param_and_how_to_allow_it(card, requested, param):
    if param is None:
        assert (
            specs.resolve_policy(card, requested).max_latency_p95_ms == card.gate.max_latency_p95_ms
        )
        return
    with pytest.raises(specs.PolicyViolation) as err:
        specs.resolve_policy(card, requested)
    message = str(err.value)
    assert param in message and "only tighten" in message and "overrides.allow" in message


def test_a_loosening_the_spec_allows_is_used_and_recorded(card):
    # card_fraud's owner allows a non-inferiority margin (the demo's canary step uses it)
    policy = specs.resolve_policy(card, {"gate_non_inferiority_margin": 0.02})
    assert policy.non_inferiority_margin == 0.02
    assert policy.overrides == (
        {
            "param": "gate_non_inferiority_margin",
            "field": "gate.non_inferiority_margin",
            "spec": None,
            "run": 0.02,
            "kind": "loosen_allowed",
        },
    )
    strict = card.model_copy(update={"overrides": specs.OverridesSpec(allow=[])})
    with pytest.raises(specs.PolicyViolation, match="gate_non_inferiority_margin"):
        specs.resolve_policy(strict, {"gate_non_inferiority_margin": 0.02})


def test_another_evaluation_set_is_refused_unless_the_spec_allows_it(card):
    strict = card.model_copy(update={"overrides": specs.OverridesSpec(allow=[])})
    with pytest.raises(specs.PolicyViolation, match="points the gate at another evaluation set"):
        specs.resolve_policy(strict, {"eval_uri": "/etc/passwd"})
    assert specs.resolve_policy(strict, {"eval_uri": ""}).eval_uri == card.eval_location


# -- where a run may read from: the spec's roots; the trigger form refuses the obvious -------------


def test_an_allowed_evaluation_set_must_still_lie_under_the_trusted_prefix(card, pipeline_home):
    """card_fraud's owner lets a run name another set (overrides.allow: evaluation.uri); the
    first task's policy still refuses one outside the trusted prefix, naming it."""
    from pipeline.uris import UriRefused

    with pytest.raises(UriRefused, match="outside model 'card_fraud''s evaluation.uri and "):
        specs.resolve_policy(card, {"eval_uri": "/etc/passwd"})
    root = (pipeline_home / "storage" / "trusted").as_uri()
    policy = specs.resolve_policy(card, {"eval_uri": f"{root}/world-b.parquet"})
    assert policy.overrides[0]["kind"] == "loosen_allowed"


def test_the_trusted_prefix_is_the_spec_s_and_narrows_what_a_run_may_name(tmp_path, pipeline_home):
    from pipeline.uris import UriRefused, eval_source

    s = specs.load_spec(
        write_spec(
            tmp_path / "narrow",
            "contract: contract.yaml\ntask: binary\n"
            "evaluation: {trusted_prefix: trusted/narrow}\n"
            "overrides: {allow: [evaluation.uri]}\n",
        )
    )
    assert s.trusted_prefix == "trusted/narrow"
    assert eval_source("trusted/narrow/b.parquet", s).endswith("/storage/trusted/narrow/b.parquet")
    with pytest.raises(UriRefused, match="trusted/narrow"):
        specs.resolve_policy(s, {"eval_uri": "trusted/card_fraud/eval.parquet"})
    pattern = specs.param_schema(s)["eval_uri"]["pattern"]
    assert re.search(pattern, "trusted/narrow/b.parquet")
    assert not re.search(pattern, "trusted/card_fraud/eval.parquet")


@pytest.mark.parametrize(
    "prefix", ["../keys", "trusted/../keys", "trusted//x", "a\\b", "t%2e", "/"]
)
def test_a_trusted_prefix_that_is_not_a_plain_folder_is_a_bad_spec(tmp_path, prefix):
    path = write_spec(
        tmp_path / "bad",
        "contract: contract.yaml\ntask: binary\n"
        + yaml.safe_dump({"evaluation": {"trusted_prefix": prefix}}),
    )
    with pytest.raises(specs.SpecError, match="evaluation.trusted_prefix.*not a plain folder"):
        specs.load_spec(path)


BATCH_OK = [
    "",
    "/srv/p/storage/landing/{name}/date=2026-03-05/batch.parquet",
    "file:///srv/p/storage/landing/{name}/b.parquet",
    "s3://pipeline/data/landing/{name}/stack/batch.parquet",
    "/srv/p/storage/landing/{name}/..hidden/b.parquet",
]
BATCH_HOSTILE = [
    "file:///proc/self/environ",
    "/etc/passwd",
    "/srv/p/storage/landing/{name}",
    "/srv/p/storage/landing/{name}/",
    "/srv/p/storage/landing/{name}_other/b.parquet",
    "/srv/p/storage/landing/{name}/../../keys/k",
    "/srv/p/storage/landing/{name}/./b.parquet",
    "/srv/p/storage/landing/{name}/%2e%2e/k",
    "/srv/p/storage/landing/{name}/a%2fb",
    "/srv/p/storage//landing/{name}/b.parquet",
    "/srv/p/storage/landing/{name}//b.parquet",
    "/srv/p/storage/landing/{name}\\..\\k",
    "file://host/srv/p/storage/landing/{name}/b.parquet",
    "/srv/p/storage/landing/{name}/b.parquet?x=1",
    "/srv/p/storage/landing/{name}/b.parquet#f",
    "FILE:///srv/p/storage/landing/{name}/b.parquet",
    "S3://pipeline/data/landing/{name}/b.parquet",
    "ftp://elsewhere/landing/{name}/b.parquet",
    "relative/landing/{name}/b.parquet",
    "landing/{name}/b.parquet",
    "/srv/p/storage/landing/{name}/b c.parquet",
]
EVAL_OK = [
    "",
    "trusted/world-b.parquet",
    "trusted/card_fraud/eval.parquet",
    "/srv/p/storage/trusted/card_fraud/eval.parquet",
    "s3://pipeline/data/trusted/x.parquet",
]
EVAL_HOSTILE = [
    "/etc/passwd",
    "file:///proc/self/environ",
    "/srv/p/storage/landing/card_fraud/b.parquet",
    "trusted",
    "trusted/../keys/k",
    "trusted/%2e%2e/keys/k",
    "trusted//x.parquet",
    "/srv/p/storage/trusted_other/x.parquet",
    "file://host/srv/p/storage/trusted/x.parquet",
    "/srv/p/storage/trusted/x.parquet?x",
    "FILE:///srv/p/storage/trusted/x.parquet",
]


def _node_matches(pattern: str, values: list[str]) -> list[bool] | None:
    """The same pattern as ECMAScript reads it (JSON Schema's dialect, the browser's form)."""
    import json
    import shutil

    node = shutil.which("node")
    if node is None:
        return None
    script = (
        "const [p, vs] = JSON.parse(process.argv[1]);"
        "const r = new RegExp(p, 'u');"
        "console.log(JSON.stringify(vs.map((v) => r.test(v))));"
    )
    out = subprocess.run(
        [node, "-e", script, json.dumps([pattern, values])],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(out.stdout)


@pytest.mark.parametrize("name", ["card_fraud", "digits"])
def test_the_batch_uri_param_refuses_the_obvious_hostile_uris(name):
    """A first line in the trigger form and the REST API (the task's check is the authority):
    JSON Schema's pattern, read by Python's re (the API server) and ECMAScript alike."""
    spec = specs.get_spec(name)
    pattern = specs.batch_uri_pattern(spec)
    ok = [u.format(name=name) for u in BATCH_OK]
    hostile = [u.format(name=name) for u in BATCH_HOSTILE]
    assert [u for u in ok if not re.search(pattern, u)] == []
    assert [u for u in hostile if re.search(pattern, u)] == []
    in_js = _node_matches(pattern, ok + hostile)
    if in_js is not None:
        assert in_js == [True] * len(ok) + [False] * len(hostile)


def test_the_eval_uri_param_refuses_a_set_outside_the_trusted_prefix(card):
    import jsonschema

    schema = {k: v for k, v in specs.param_schema(card)["eval_uri"].items() if k != "default"}
    for uri in EVAL_OK:
        jsonschema.validate(uri, schema)
    for uri in EVAL_HOSTILE:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(uri, schema)
    in_js = _node_matches(schema["pattern"], EVAL_OK + EVAL_HOSTILE)
    if in_js is not None:
        assert in_js == [True] * len(EVAL_OK) + [False] * len(EVAL_HOSTILE)
    # digits' spec names no other set: the Param takes none at all
    digits = specs.param_schema(specs.get_spec("digits"))["eval_uri"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate("trusted/digits/other.parquet", digits)


def test_for_a_lower_is_better_metric_a_tighter_floor_is_lower(tmp_path):
    s = specs.load_spec(
        write_spec(
            tmp_path / "ll",
            "contract: contract.yaml\ntask: binary\n"
            "metrics: {primary: log_loss}\ngate: {floors: {log_loss: 0.5}}\n",
        )
    )
    assert specs.resolve_policy(s, {"gate_floor": 0.4}).floor == 0.4
    with pytest.raises(specs.PolicyViolation):
        specs.resolve_policy(s, {"gate_floor": 0.6})
    assert specs.param_schema(s)["gate_floor"]["maximum"] == 0.5


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--gate-floor", "0.5"], "gate_floor=0.5 loosens the policy"),
        (["--gate-floor", "0"], "gate_floor=0.0 loosens the policy"),  # 0 is a value, not "unset"
        (["--gate-margin", "0"], "gate_margin=0.0 loosens the policy"),
        (["--max-epochs", "31"], "outside model 'card_fraud''s budget 1..30"),
    ],
)
def test_the_cli_refuses_a_looser_flag_before_reading_anything(pipeline_home, flags, says):
    # a batch inside the model's landing prefix (not there: nothing may read it anyway), so
    # the flag is what is refused, not the location
    batch = (pipeline_home / "storage" / "landing" / "card_fraud" / "x.parquet").as_uri()
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "run",
            "--model",
            "card_fraud",
            "--batch",
            batch,
            *flags,
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        env={**__import__("os").environ, "PIPELINE_HOME": str(pipeline_home)},
    )
    assert out.returncode == 2 and says in out.stderr, out.stderr[-2000:]
    assert not (pipeline_home / "mlflow").exists()  # no run was even created


# -- dataset-neutral: no column of any contract is named in pipeline/, dags/ or plugins/ --------


def _contract_columns() -> set[str]:
    names: set[str] = set()
    for path in (ROOT / "models").glob("*/*.yaml"):
        raw = yaml.safe_load(path.read_text())
        if isinstance(raw, dict) and "columns" in raw:
            names |= {c["name"] for c in raw["columns"]}
            names.add(raw["target"]["name"])
    return names


def _string_literals(path: Path) -> set[str]:
    """Every string constant in the module (docstrings and f-string parts included)."""
    return {
        n.value
        for n in ast.walk(ast.parse(path.read_text()))
        if isinstance(n, ast.Constant) and isinstance(n.value, str)
    }


def test_no_dataset_column_is_named_in_the_code():
    columns = _contract_columns()
    assert {"channel", "is_fraud", "digit", "image_id"} <= columns  # both models' contracts read
    generator = ROOT / "pipeline" / "data" / "generate.py"  # the reference-data generator
    offenders = []
    for folder in ("pipeline", "dags", "plugins"):
        for path in (ROOT / folder).rglob("*.py"):
            if path == generator:
                continue
            for text in _string_literals(path):
                words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", text))
                hit = sorted(words & columns)
                if hit:
                    offenders.append(f"{path.relative_to(ROOT)}: {hit} in {text[:60]!r}")
    assert not offenders, "\n".join(offenders)


# -- a contract we never saw: no id column, no time column, 120 rows, 3 classes --------------------


IRIS_CONTRACT = """
name: iris
target: {name: species, values: [0, 1, 2]}
row_count: {min: 20}
columns:
  - {name: sepal_length, type: float, min: 0, max: 20}
  - {name: sepal_width, type: float, min: 0, max: 20}
  - {name: petal_length, type: float, min: 0, max: 20}
  - {name: petal_width, type: float, min: 0, max: 20}
  - {name: species, type: int, min: 0, max: 2}
"""


def test_iris_without_id_or_time_column_gets_its_first_champion(pipeline_home, tmp_path):
    """The classic 3-class set of 120 rows: a legitimate feature separates one class
    perfectly (univariate AUC 1.0), which the old leakage rule quarantined. Now: too few rows
    to judge leakage without a champion, the strong features are named, and training splits
    its holdout by row content (no id column)."""
    from sklearn.datasets import load_iris

    from pipeline import registry, stages, storage
    from pipeline.ingest import parquet_bytes

    folder = tmp_path / "iris"
    folder.mkdir()
    (folder / "contract.yaml").write_text(IRIS_CONTRACT)
    (folder / "model.yaml").write_text(
        "contract: contract.yaml\ntask: multiclass\ntraining: {batch_size: 16, max_epochs: 40}\n"
    )
    iris = load_iris(as_frame=True).frame
    iris.columns = ["sepal_length", "sepal_width", "petal_length", "petal_width", "species"]
    shuffled = iris.sample(frac=1.0, random_state=0).reset_index(drop=True)
    root = (pipeline_home / "storage").as_uri()
    batch = storage.write_bytes(
        f"{root}/landing/iris/b.parquet", parquet_bytes(shuffled.iloc[:120])
    ).uri
    storage.write_bytes(f"{root}/trusted/iris/eval.parquet", parquet_bytes(shuffled.iloc[120:]))
    with specs.use_spec(specs.load_spec(folder / "model.yaml")):
        ctx = stages.RunContext("test", "iris-1", "2026-03-01T00:00:00Z")
        ing = stages.ingest_batch(ctx, batch)
        validated = stages.validate_batch(ctx, ing)
        assert validated.verdict == "pass"
        assert (
            "no time column" in validated.summary and "leakage check skipped" in validated.summary
        )
        assert "petal_length" in validated.summary  # named as close to the bar, not rejected
        decision = stages.decide_retrain(ctx, stages.detect_drift(ctx, ing))
        trained = stages.train_model(ctx, ing)
        verified = stages.verify_checkpoint(ctx, trained)
        gated = stages.gate_promotion(ctx, stages.register_challenger(ctx, ing, trained, verified))
        promoted = stages.promote_champion(ctx, gated)
        assert decision.verdict == "train" and promoted.verdict == "promoted", gated.summary
        champ = registry.alias_version(registry.CHAMPION)
        assert champ is not None and float(champ.tags["eval.accuracy"]) > 0.8
        # what the stop cost in validation passes, and whose weights were kept, on the run
        tags = registry.client().get_run(trained.mlflow_run_id).data.tags
        assert int(tags["train.validations"]) >= trained.epochs  # at least each epoch's end
        assert 0 < int(tags["train.best_step"]) <= int(tags["train.steps"]) == trained.steps


def test_a_cli_run_never_promotes_past_a_required_approval(pipeline_home, tmp_path):
    """require_approval (spec or flag): the CLI has no one to ask, so the gated version stays
    challenger; the promote stage refuses outright."""
    from models.digits import data
    from pipeline import registry, storage

    root = (pipeline_home / "storage").as_uri()
    files = data.write_batches(f"{root}/landing/digits", seed=0)
    storage.write_bytes(f"{root}/trusted/digits/eval.parquet", storage.read_bytes(files["eval"]))
    env = {**__import__("os").environ, "PIPELINE_HOME": str(pipeline_home)}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "run",
            "--model",
            "digits",
            "--batch",
            files["batch-1"],
            "--run-id",
            "a1",
            "--require-approval",
            "--max-epochs",
            "20",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "requires approval: it stays challenger" in out.stderr
    with specs.use_spec(specs.get_spec("digits")):
        assert registry.alias_version(registry.CHAMPION) is None
        assert registry.alias_version(registry.CHALLENGER) is not None
    rec = tmp_path / "gated.json"
    rec.write_text("{}")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "promote",
            "--model",
            "digits",
            "--in",
            str(rec),
            "--require-approval",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        env=env,
    )
    assert out.returncode == 2 and "requires a human approval" in out.stderr
