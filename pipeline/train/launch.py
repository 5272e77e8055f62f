"""``train_model`` over several processes: ``torchrun --standalone`` runs the same stage
(``python -m pipeline train_model``) once per rank, in this host or pod; rank 0 publishes
the checkpoint and writes the stage's record, which the launching process returns.
``distributed.py`` is what each rank does; this is how they are started."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineRejection

log = logging.getLogger(__name__)


def torchrun_command(
    procs: int,
    spec_path: str,
    inp: Path,
    out: Path,
    *,
    dag_id: str,
    run_id: str,
    run_after: str | None,
    options: dict[str, Any],
) -> list[str]:
    """The command line: one ``python -m pipeline train_model`` per rank, the same options."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={procs}",
        "-m",
        "pipeline",
        "train_model",
        "--spec",
        spec_path,
        "--in",
        str(inp),
        "--record-out",
        str(out),
        "--dag-id",
        dag_id,
        "--run-id",
        run_id,
    ]
    if run_after:
        cmd += ["--run-after", run_after]
    for name, value in options.items():
        if value is not None:
            cmd += [f"--{name.replace('_', '-')}", str(value)]
    return cmd


def run_under_torchrun(
    procs: int,
    spec_path: str,
    ingested: dict[str, Any],
    *,
    dag_id: str,
    run_id: str,
    run_after: str | None,
    options: dict[str, Any],
) -> dict[str, Any]:
    """Launch the ranks and wait; their output streams into this task's log. A diverged
    training is a rejection (deterministic, not retried); any other failure is retried."""
    with tempfile.TemporaryDirectory(prefix="torchrun-") as tmp:
        inp, out = Path(tmp) / "ingested.json", Path(tmp) / "trained.json"
        inp.write_text(json.dumps(ingested, default=str))
        cmd = torchrun_command(
            procs,
            spec_path,
            inp,
            out,
            dag_id=dag_id,
            run_id=run_id,
            run_after=run_after,
            options=options,
        )
        log.info("train_model: %d processes: %s", procs, " ".join(cmd))
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        rc = subprocess.run(cmd, env=env, check=False).returncode
        rec = json.loads(out.read_text()) if out.exists() else None
        if rec is not None and "rejected" in rec:  # diverged: deterministic, not retried
            raise PipelineRejection(rec["rejected"])
        if rc != 0 or rec is None:
            raise RuntimeError(
                f"train_model under torchrun ({procs} processes) failed with exit code {rc}; "
                "see the ranks' output above"
            )
        return dict(rec)
