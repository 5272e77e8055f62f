"""Contract validation of a batch: an exact streaming pass plus Great Expectations 1.x.

One list of checks is generated from the :class:`~pipeline.contract.DataContract`: row
count, safe and unique column names, each column's existence, type (numbers stored as
strings fail), nulls within the tolerance, range, categories, id uniqueness, label values,
event times not after an explicit ``now``, no constant feature, no feature that predicts
the label on its own (leakage), plus the contract's user ``expectations``.

How it scales (10M rows never become one frame)
    *Exact streaming pass.* The batch is read as Parquet record batches
    (:class:`pipeline.ingest.TableSource`, page checksums verified) and every count is
    computed over every row with pyarrow/numpy: nulls (null or NaN), out-of-range values
    (±Inf included), unknown categories and labels, future event times, types from the
    Arrow schema, distinct values of features. Duplicate ids are exact too: ids are hashed
    to uint64 (integers are their own hash), sorted and compared; colliding hashes are
    re-checked on the id values themselves in a second pass over the id column, so a hash
    collision can cost time but never a wrong count. Memory: one record batch plus 16
    bytes per id (its hash and the sorted copy).

    *Great Expectations on a bounded sample.* The GX suite (the same generated
    expectations, plus the user expectations) runs on a seeded uniform sample of at most
    ``sample_rows`` rows (every row when the batch is smaller, so small batches are checked
    by GX in full). We chose this over validating every row-group with GX and merging:
    merging GX results is not exact for uniqueness across chunks or for ``mostly``
    fractions, and GX on pandas costs seconds per million rows. GX also costs ~10 ms per
    expectation whatever the rows, so on a wide contract it cross-checks at most
    ``entry.GX_CROSS_CHECKS`` (256) generated expectations: every failing one, then each
    kind (expectation x column type) on its first columns in turn; the report's notes say
    how many. For a generated
    expectation the exact streaming outcome is the verdict (``source="exact"``; GX's view
    of the sample is kept as ``gx_sample_success``); a user expectation has no exact
    twin, so GX's result on the sample is the verdict (``source="gx"`` when the sample is
    the whole batch, ``"gx-sample"`` otherwise: an aggregate such as a mean is then an
    estimate whose standard error is the column's sd / sqrt(sample rows)).

    *Leakage* is the one other sampled check: the univariate ROC AUC of each feature for
    the label (max(AUC, 1-AUC); categories scored by their positive rate; with more than
    two classes one-vs-rest per class, the worst class named), computed on the same
    sample. By Hoeffding's inequality for this U-statistic the estimate is within
    ``sqrt(ln(2/0.01) / (2 min(n_pos, n_neg)))`` of the batch's AUC with 99% probability;
    the report states the bound. Leakage is *new* predictive power: with a reference (the
    champion's training snapshot, ``reference_uri``; the same AUCs on a bounded sample of
    it) a feature is rejected only when its AUC reaches ``leakage.reference_auc`` and rose
    more than ``leakage.max_rise`` above the reference's, so a feature that was always that
    strong passes. Without a reference only a near-perfect AUC (``leakage.max_auc``) on at
    least ``leakage.min_rows`` rows is rejected; on fewer rows the check is skipped. A
    copied label scores 1.0. Features that pass but came close are named in the report.

Column names are data: they select columns, are escaped in HTML and shortened in text,
and never become paths or MLflow keys.

Modules
    :mod:`~pipeline.validate.report` (the report types and their text and HTML),
    :mod:`~pipeline.validate.checks` (contract → checks), :mod:`~pipeline.validate.suite`
    (Great Expectations), :mod:`~pipeline.validate.scan` (the streaming pass, with
    :mod:`~pipeline.validate.arrow` and the exact-result mapping
    :mod:`~pipeline.validate.exact`), :mod:`~pipeline.validate.leakage` and
    :mod:`~pipeline.validate.entry` (the entry points). Importing the package imports
    neither ``great_expectations`` (seconds to import) nor the storage backends: they are
    imported inside the functions that use them.
"""

from __future__ import annotations

from pipeline.validate.arrow import hash_values, pa_types
from pipeline.validate.checks import ContractCheck, contract_checks
from pipeline.validate.entry import SAMPLE_ROWS, validate_frame, validate_source, validate_uri
from pipeline.validate.leakage import Reference
from pipeline.validate.report import (
    MAX_NAME_CHARS,
    NO_LEAKAGE,
    NO_TIME_COLUMN_NOTE,
    PARTIAL_UNEXPECTED,
    READABLE,
    SAFE_NAMES,
    ExpectationResult,
    ValidationReport,
    display_name,
    render_html,
)
from pipeline.validate.suite import build_suite

__all__ = [
    "MAX_NAME_CHARS",
    "NO_LEAKAGE",
    "NO_TIME_COLUMN_NOTE",
    "PARTIAL_UNEXPECTED",
    "READABLE",
    "SAFE_NAMES",
    "SAMPLE_ROWS",
    "ContractCheck",
    "ExpectationResult",
    "Reference",
    "ValidationReport",
    "build_suite",
    "contract_checks",
    "display_name",
    "hash_values",
    "pa_types",
    "render_html",
    "validate_frame",
    "validate_source",
    "validate_uri",
]
