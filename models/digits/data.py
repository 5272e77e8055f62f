"""The ``digits`` dataset: scikit-learn's 8x8 handwritten digits, as pipeline batches.

The one place that knows this dataset's columns. ``sklearn.datasets.load_digits()``
ships with scikit-learn (no download): 1797 images, 64 pixels with integer ink levels
0..16, labels 0..9. This module names the columns, adds a string id, and writes a
deterministic, stratified split as Parquet:

* ``eval.parquet``    450 rows, the trusted evaluation set (never trained on);
* ``batch-1.parquet`` 120 rows (12 per digit), a small first batch: a modest first
  champion (~0.88 eval accuracy);
* ``batch-2.parquet`` the other 1227 rows: a retrain on it beats that champion by a
  clear margin (~0.97).

Pixels that are rarely inked are left out. The pipeline's validation rejects a feature
that is constant in a batch; ``px_r0_c0``, ``px_r4_c0`` and ``px_r4_c7`` are 0 in every
image, and eleven more edge pixels (the rest of the left column, the top six of the
right) are inked in fewer than 5% of the images, so a 120-row batch would often hold
them constant too. That leaves :data:`PIXELS` (50 columns), the columns
``contract.yaml`` declares (``tests/unit/test_digits_model.py`` checks they agree).

Usage::

    python -m models.digits.data --out DIR_OR_URI [--seed 0]

Writes never overwrite (``pipeline.storage``): writing the same split again is a no-op,
writing a different one to the same place is an error.
"""

from __future__ import annotations

import argparse
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

ID_COLUMN = "image_id"
TARGET = "digit"
CLASSES = tuple(range(10))
SIDE = 8
ALL_PIXELS = tuple(f"px_r{r}_c{c}" for r in range(SIDE) for c in range(SIDE))
MIN_INKED_SHARE = 0.05
#: the pixels inked in fewer than MIN_INKED_SHARE of the images (three of them in none)
DROPPED_PIXELS = (
    "px_r0_c0",
    "px_r0_c7",
    "px_r1_c0",
    "px_r1_c7",
    "px_r2_c0",
    "px_r2_c7",
    "px_r3_c0",
    "px_r3_c7",
    "px_r4_c0",
    "px_r4_c7",
    "px_r5_c0",
    "px_r5_c7",
    "px_r6_c0",
    "px_r7_c0",
)
#: the pixel columns of the contract, in row-major order
PIXELS = tuple(p for p in ALL_PIXELS if p not in DROPPED_PIXELS)
#: rows of the trusted set and of the first batch; the second batch takes the rest
SIZES = {"eval": 450, "batch-1": 120}
FILES = {"eval": "eval.parquet", "batch-1": "batch-1.parquet", "batch-2": "batch-2.parquet"}


@lru_cache(maxsize=1)
def _raw() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = d.data.astype(np.int64)  # float64 in sklearn, integral 0..16
    y = d.target.astype(np.int64)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def rarely_inked() -> tuple[str, ...]:
    """The pixels inked in fewer than :data:`MIN_INKED_SHARE` of the images, computed
    (:data:`DROPPED_PIXELS` is this, written out)."""
    x, _ = _raw()
    inked = (x > 0).mean(axis=0)
    return tuple(p for p, share in zip(ALL_PIXELS, inked, strict=True) if share < MIN_INKED_SHARE)


def frame() -> pd.DataFrame:
    """All 1797 images: ``image_id`` (``img-00000``.. in sklearn's order), the kept pixel
    columns (int64, 0..16) and ``digit`` (int64, 0..9)."""
    x, y = _raw()
    keep = [ALL_PIXELS.index(p) for p in PIXELS]
    df = pd.DataFrame(x[:, keep], columns=list(PIXELS))
    df.insert(0, ID_COLUMN, [f"img-{i:05d}" for i in range(len(df))])
    df[TARGET] = y
    return df


def _allocate(counts: np.ndarray, total: int) -> np.ndarray:
    """Split ``total`` over classes in proportion to ``counts`` (largest remainder), so
    the sum is exact and every class gets its share to within one row."""
    quota = counts * total / counts.sum()
    out = np.floor(quota).astype(np.int64)
    short = total - int(out.sum())
    order = np.argsort(-(quota - out), kind="stable")  # ties: lower class first
    out[order[:short]] += 1
    return out


def split(seed: int = 0) -> dict[str, pd.DataFrame]:
    """The stratified split ``{"eval", "batch-1", "batch-2"}``, each sorted by image_id.

    Deterministic for a seed; disjoint; together every row once."""
    df = frame()
    y = df[TARGET].to_numpy()
    classes = np.array(CLASSES)
    counts = np.array([(y == c).sum() for c in classes])
    rng = np.random.default_rng(seed)
    per_class = {c: rng.permutation(np.flatnonzero(y == c)) for c in classes}
    parts: dict[str, list[np.ndarray]] = {name: [] for name in FILES}
    taken = dict.fromkeys(classes, 0)
    for name, size in SIZES.items():
        for c, n in zip(classes, _allocate(counts, size), strict=True):
            parts[name].append(per_class[c][taken[c] : taken[c] + n])
            taken[c] += n
    for c in classes:
        parts["batch-2"].append(per_class[c][taken[c] :])
    return {
        name: df.iloc[np.sort(np.concatenate(idx))].reset_index(drop=True)
        for name, idx in parts.items()
    }


def write_batches(out: str | Path, seed: int = 0) -> dict[str, str]:
    """Write the split under ``out`` (a folder, ``file://`` or ``s3://`` URI) as
    ``eval.parquet``, ``batch-1.parquet``, ``batch-2.parquet``; return name -> URI."""
    from pipeline import storage
    from pipeline.ingest import parquet_bytes

    base = str(out)
    written = {}
    for name, df in split(seed).items():
        uri = storage.join(base, FILES[name])
        storage.write_bytes(uri, parquet_bytes(df))
        written[name] = uri
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m models.digits.data", description=(__doc__ or "").split("\n\n")[0]
    )
    p.add_argument("--out", required=True, help="folder or URI to write the three Parquet files to")
    p.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    args = p.parse_args(argv)
    parts = split(args.seed)
    for name, uri in write_batches(args.out, args.seed).items():
        print(f"{name:8s} {len(parts[name]):5d} rows  {uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
