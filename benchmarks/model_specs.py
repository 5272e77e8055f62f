"""What adding models costs: DAG parse time with many specs, and a user factory in training.

1. **Parse time per spec.** ``dags/`` is parsed (Airflow's DagBag, in a fresh interpreter,
   as the dag-processor does) with a models root of 1 spec and of ``--many`` specs (copies of
   ``models/card_fraud`` under other names). Reported: seconds for each, the marginal cost
   per added spec, and ``ratio_many_vs_one``. Target: parsing stays light — the marginal
   cost per spec under 0.1 s, so 50 models add under 5 s to a parse.
2. **A factory from a spec-local module vs the built-in MLP**, same data, same budget: the
   per-step time of training ``models/digits/net.py``'s residual network through the
   pipeline's factory path against the same network built directly (no factory, no digest,
   no contract check), interleaved to share the machine's noise. Target: ratio ≤ 1.05 (the
   factory path adds nothing per step: it only runs once, before training).

    python -m benchmarks.model_specs [--many 20] [--epochs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._targets import finish, target

ROOT = Path(__file__).resolve().parents[1]

PARSE = (
    "import sys, time, json; sys.path.insert(0, {dags!r}); t0 = time.perf_counter();"
    "from airflow.dag_processing.dagbag import DagBag; b = DagBag(dag_folder={dags!r});"
    "print(json.dumps({{'seconds': time.perf_counter() - t0, 'dags': len(b.dags), 'errors': len(b.import_errors)}}))"
)


def parse_seconds(models_root: Path, home: Path, repeats: int = 3) -> dict:
    env = {
        **os.environ,
        "PIPELINE_MODELS_ROOT": str(models_root),
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    }
    runs = []
    for _ in range(repeats):
        out = subprocess.run(
            [sys.executable, "-c", PARSE.format(dags=str(ROOT / "dags"))],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            cwd=ROOT,
            check=True,
        )
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    best = min(runs, key=lambda r: r["seconds"])
    return best


def make_root(tmp: Path, n: int) -> Path:
    root = tmp / f"models-{n}"
    for i in range(n):
        dest = root / f"model_{i:03d}"
        shutil.copytree(ROOT / "models" / "card_fraud", dest)
        text = (
            (dest / "model.yaml")
            .read_text()
            .replace("registered_model: card-fraud", f"registered_model: model-{i:03d}")
        )
        (dest / "model.yaml").write_text(text)
    return root


def factory_overhead(epochs: int) -> dict:
    import importlib.util

    import torch

    from models.digits import data
    from pipeline.spec import get_spec
    from pipeline.train.features import fit_features, labels, transform
    from pipeline.train.model import ModelInputs, build_model, model_ref_for

    spec = get_spec("digits")
    contract = spec.contract_obj()
    df = data.frame()
    fs = fit_features(df, contract)
    x, y = torch.from_numpy(transform(df, fs)), torch.from_numpy(labels(df, fs))
    inputs = ModelInputs(fs.width, len(fs.classes), fs, "multiclass")
    code = spec.factory_module_file
    mod_spec = importlib.util.spec_from_file_location("bench_net", code)
    module = importlib.util.module_from_spec(mod_spec)  # type: ignore[arg-type]
    mod_spec.loader.exec_module(module)  # type: ignore[union-attr]

    def via_factory():
        return build_model(model_ref_for(spec.model.factory, spec.model.kwargs, code), inputs, code)

    def direct():
        return module.build(inputs, **spec.model.kwargs)

    def step_seconds(make) -> float:
        torch.manual_seed(0)
        model = make()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        loss_fn = torch.nn.CrossEntropyLoss()
        steps, t0 = 0, time.perf_counter()
        for _ in range(epochs):
            for i in range(0, len(x), 64):
                opt.zero_grad()
                loss_fn(model(x[i : i + 64]), y[i : i + 64]).backward()
                opt.step()
                steps += 1
        return (time.perf_counter() - t0) / steps

    torch.set_num_threads(1)
    a, b = [], []
    for _ in range(3):  # interleaved
        a.append(step_seconds(via_factory))
        b.append(step_seconds(direct))
    t0 = time.perf_counter()
    via_factory()
    build_s = time.perf_counter() - t0
    return {
        "step_ms_factory": min(a) * 1e3,
        "step_ms_direct": min(b) * 1e3,
        "ratio_factory_vs_direct": min(a) / min(b),
        "factory_build_seconds_once": build_s,
    }


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--many", type=int, default=20)
    p.add_argument("--epochs", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        one = parse_seconds(make_root(t, 1), t / "af1")
        many = parse_seconds(make_root(t, args.many), t / "afn")
    per_spec = (many["seconds"] - one["seconds"]) / (args.many - 1)
    result = {
        "bench": "model_specs",
        "specs_many": args.many,
        "parse_seconds_one": round(one["seconds"], 3),
        "parse_seconds_many": round(many["seconds"], 3),
        "dags_one": one["dags"],
        "dags_many": many["dags"],
        "import_errors": one["errors"] + many["errors"],
        "parse_seconds_per_added_spec": round(per_spec, 4),
        "ratio_many_vs_one": round(many["seconds"] / one["seconds"], 3),
        **{k: round(v, 4) for k, v in factory_overhead(args.epochs).items()},
    }
    targets = [
        target("parse_seconds_per_added_spec", result["parse_seconds_per_added_spec"], "<", 0.1),
        target("ratio_factory_vs_direct", result["ratio_factory_vs_direct"], "<=", 1.05),
        target("import_errors", result["import_errors"], "==", 0),
        target("dags_many", many["dags"], "==", 2 * args.many),
    ]
    print(finish(result, targets))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
