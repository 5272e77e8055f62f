"""Arrow helpers of the exact pass: contract types against Arrow types, decoding, and the
vectorised uint64 hash of id values.

pyarrow is imported inside the functions (as the rest of the package does).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pyarrow as pa


def pa_types() -> Any:
    """``pyarrow.types``, imported on first use."""
    import pyarrow as pa

    return pa.types


def arrow_type_ok(contract_type: str, t: pa.DataType) -> bool:
    """Whether Arrow type ``t`` holds the contract type (dictionaries by their values)."""
    import pyarrow as pa

    if pa.types.is_dictionary(t):
        t = t.value_type
    if contract_type == "float":
        return pa.types.is_floating(t) or pa.types.is_integer(t)
    if contract_type == "int":
        return pa.types.is_integer(t)
    if contract_type == "bool":
        return pa.types.is_boolean(t)
    if contract_type in ("category", "string"):
        return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)
    if contract_type == "timestamp":
        return pa.types.is_timestamp(t)
    return False


def decode(arr: pa.Array) -> pa.Array:
    """Dictionary arrays decoded, string views as plain strings."""
    import pyarrow as pa

    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if pa.types.is_string_view(arr.type):
        arr = arr.cast(pa.string())
    return arr


def floats(arr: pa.Array) -> np.ndarray:
    """Numeric values as float64; nulls as NaN."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_boolean(arr.type):
        arr = pc.cast(arr, pa.int8())
    return np.asarray(arr.to_numpy(zero_copy_only=False), dtype=np.float64)


def _mix64(h: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser (wrapping uint64 arithmetic)."""
    h = h ^ (h >> np.uint64(30))
    h = h * np.uint64(0xBF58476D1CE4E5B9)
    h = h ^ (h >> np.uint64(27))
    h = h * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


def _powers(n: int) -> np.ndarray:
    p = np.full(max(n, 1), 0x100000001B3, dtype=np.uint64)
    p[0] = 1
    return np.multiply.accumulate(p, dtype=np.uint64)


def hash_values(arr: pa.Array) -> np.ndarray:
    """A uint64 per value: integers are their own hash (exact); strings are hashed from
    Arrow's buffers with vectorised numpy (polynomial hash + splitmix64). Nulls hash to 0;
    callers mask them out. Equal values always hash equal."""
    import pyarrow as pa

    arr = decode(arr)
    t = arr.type
    if pa.types.is_integer(t):
        vals = arr.to_numpy(zero_copy_only=False)
        if vals.dtype.kind == "f":  # nulls made it float; nulls are masked out anyway
            vals = np.nan_to_num(vals).astype(np.int64)
        return np.asarray(vals).astype(np.int64).view(np.uint64)
    if not (pa.types.is_string(t) or pa.types.is_large_string(t)):
        arr = arr.cast(pa.string())
        t = arr.type
    n = len(arr)
    if n == 0:
        return np.zeros(0, dtype=np.uint64)
    _, off_buf, data_buf = arr.buffers()
    off_type = np.int32 if pa.types.is_string(t) else np.int64
    offsets = np.frombuffer(
        off_buf, dtype=off_type, count=n + 1, offset=arr.offset * np.dtype(off_type).itemsize
    )
    offsets = offsets.astype(np.int64)
    base, end = int(offsets[0]), int(offsets[-1])
    seg = (
        np.frombuffer(data_buf, dtype=np.uint8)[base:end]
        if data_buf is not None
        else np.zeros(0, np.uint8)
    )
    lengths = np.diff(offsets)
    longest = int(lengths.max())
    powers = _powers(longest)
    if longest == 0:
        h = np.zeros(n, dtype=np.uint64)
    elif (lengths == longest).all():  # fixed width: the common case for ids
        h = (seg.reshape(n, longest).astype(np.uint64) * powers[:longest]).sum(
            axis=1, dtype=np.uint64
        )
    else:
        starts = offsets[:-1] - base
        pos = np.arange(len(seg), dtype=np.int64) - np.repeat(starts, lengths)
        contrib = seg.astype(np.uint64) * powers[pos]
        h = np.zeros(n, dtype=np.uint64)
        nonempty = lengths > 0
        h[nonempty] = np.add.reduceat(contrib, starts[nonempty].astype(np.intp))
    h = h ^ (lengths.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15))
    return _mix64(h)
