"""The table ``make bench`` ends with: every benchmark's targets, each with its figure.

Reads the ``<bench>.out`` files ``make bench`` wrote (each benchmark's whole stdout; its
last line is the JSON of :func:`benchmarks._targets.finish`) and the ``<bench>.rc`` exit
codes, and prints one row per target, then one line per benchmark that did not run, was
skipped (``"skipped": reason``) or ended without a verdict line.

    python -m benchmarks._table .local/bench
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def verdict_line(text: str) -> dict[str, Any] | None:
    """The last line of ``text`` that is a JSON object, or ``None``."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                got = json.loads(line)
            except ValueError:
                return None
            return got if isinstance(got, dict) else None
    return None


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def rows(folder: Path) -> tuple[list[tuple[str, str, str, str, str]], list[str]]:
    """(table rows: bench, target, value, bound, met), notes for benches without targets."""
    table: list[tuple[str, str, str, str, str]] = []
    notes: list[str] = []
    for out in sorted(folder.glob("*.out")):
        bench = out.stem
        rc_file = out.with_suffix(".rc")
        rc = int(rc_file.read_text().strip() or 0) if rc_file.exists() else 0
        got = verdict_line(out.read_text(errors="replace"))
        if rc != 0:
            notes.append(f"{bench}: exited {rc} (did not run to the end; see {out})")
        elif got is None:
            notes.append(f"{bench}: no JSON verdict line (see {out})")
        elif got.get("skipped"):
            notes.append(f"{bench}: skipped: {got['skipped']}")
        elif not got.get("targets"):
            notes.append(f"{bench}: measured, no targets")
        else:
            for name, t in got["targets"].items():
                mark = "met" if t.get("met") else "MISSED"
                table.append((bench, name, _fmt(t.get("value")), str(t.get("target")), mark))
    return table, notes


def render(folder: Path) -> tuple[str, int, int]:
    """The table's text, the number of targets missed and of benchmarks that failed to run."""
    table, notes = rows(folder)
    head = ("benchmark", "target", "value", "bound", "")
    widths = [max(len(r[i]) for r in [head, *table]) for i in range(5)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in [head, *table]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    missed = sum(r[4] == "MISSED" for r in table)
    failed = sum("exited" in n or "no JSON" in n for n in notes)
    lines += notes
    lines.append(
        f"{len(table) - missed} of {len(table)} targets met; {missed} missed; "
        f"{failed} benchmark(s) did not run"
    )
    return "\n".join(lines), missed, failed


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not Path(args[0]).is_dir():
        print(
            "usage: python -m benchmarks._table FOLDER (the .out/.rc files make bench wrote)",
            file=sys.stderr,
        )
        return 2
    text, _, failed = render(Path(args[0]))
    print(text)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
