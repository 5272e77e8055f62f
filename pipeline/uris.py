"""Where a run may read from: every batch and evaluation URI confined to its model's roots.

A trigger (a DAG Param, an asset event, a CLI flag) names a URI; :func:`confine` is the one
place that decides whether it may be read. It takes the URI *literally* — nothing is
percent-decoded, case-folded or normalised into something else — and refuses, before
anything is read:

* another scheme than ``file://`` or ``s3://`` (in lower case), or a relative path;
* a ``file://host/`` authority (``localhost`` too), a ``?query`` or ``#fragment``;
* backslashes, control characters, percent-encoded bytes (``%2e%2e``, ``%2f``);
* empty segments (``landing//x``, ``s3://bucket//key``, a trailing ``/``), ``.`` and ``..``;
* an S3 bucket that is not a plain bucket name (``user@bucket``, ``bucket:80``);
* anything whose canonical location is not inside one of the roots: local paths are
  compared after resolving every symlink (the file's and its parent folders'), S3 URIs by
  bucket and whole key segments (``s3://pipeline-evil/`` is not in ``s3://pipeline/``,
  ``landing/card_fraud_other/`` is not in ``landing/card_fraud/``).

It returns the canonical URI (symlinks resolved), and callers read *that* one.

A model's roots (:func:`batch_roots`, :func:`trusted_roots`):

* a **batch** — the spec's landing prefix under the storage root, and each of its
  ``landing.allowed_sources``;
* an **evaluation set** — the spec's own ``evaluation.uri``, or one a run names (when
  ``overrides.allow`` lists ``evaluation.uri``) under the spec's trusted prefix
  (``evaluation.trusted_prefix``, default ``trusted/`` under the storage root).

The DAG's Param patterns (``pipeline.spec.batch_uri_pattern``) are a first line in the form;
this module is the authority, in the task and the CLI.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline import storage
from pipeline.settings import get_settings
from pipeline.spec import ModelSpec, PolicyViolation, active

MAX_LENGTH = 2048
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_PERCENT = re.compile(r"%[0-9A-Fa-f]{2}")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")


class UriRefused(PolicyViolation):
    """A URI a run named lies outside the roots it may read from (or could be read as
    something else); refused before anything is read, and never retried."""


@dataclass(frozen=True)
class Location:
    """A checked location: ``file`` and its path segments (symlinks resolved), or ``s3``,
    its bucket and key segments."""

    scheme: str
    bucket: str
    parts: tuple[str, ...]

    @property
    def uri(self) -> str:
        if self.scheme == "s3":
            return f"s3://{self.bucket}/" + "/".join(self.parts)
        return storage.file_uri(Path("/" + "/".join(self.parts)))

    def within(self, root: Location) -> bool:
        """Inside the folder ``root``, by whole segments."""
        return (
            self.scheme == root.scheme
            and self.bucket == root.bucket
            and len(self.parts) > len(root.parts)
            and self.parts[: len(root.parts)] == root.parts
        )


def _why_not(uri: object) -> str | None:
    """What makes ``uri`` ambiguous as written, or None."""
    if not isinstance(uri, str) or not uri:
        return "it is not a URI"
    if len(uri) > MAX_LENGTH:
        return f"it is longer than {MAX_LENGTH} characters"
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in uri):
        return "it contains a control character"
    if "\\" in uri:
        return "it contains a backslash (the separator is '/')"
    if _PERCENT.search(uri):
        return (
            "it contains a percent-encoded character (paths are read literally: write it plainly)"
        )
    if "?" in uri or "#" in uri:
        return "it has a query or fragment part ('?', '#')"
    return None


def _segments(path: str) -> tuple[str, ...]:
    parts = tuple(path.split("/"))
    if any(p == "" for p in parts):
        raise UriRefused("it has an empty path segment ('//' or a trailing '/')")
    if any(p in (".", "..") for p in parts):
        raise UriRefused("it has a '.' or '..' segment")
    return parts


def parse(uri: str, *, folder: bool = False) -> Location:
    """``uri`` checked as written (UriRefused says why not); a local path comes back with
    every symlink resolved. ``folder``: a root, which may be a whole bucket."""
    why = _why_not(uri)
    if why:
        raise UriRefused(why)
    if uri.startswith("s3://"):
        bucket, slash, key = uri[len("s3://") :].partition("/")
        if not _BUCKET.match(bucket) or ".." in bucket:
            raise UriRefused(f"{bucket!r} is not an S3 bucket name")
        if not key:
            if folder and not slash:
                return Location("s3", bucket, ())
            raise UriRefused("it names a bucket, not an object")
        return Location("s3", bucket, _segments(key))
    if uri.startswith("file://"):
        path = uri[len("file://") :]
        if not path.startswith("/"):
            raise UriRefused("it has a file:// authority (a host): write file:///absolute/path")
    elif uri.startswith("/"):
        path = uri
    else:
        m = _SCHEME.match(uri)
        if m and m.group(1).lower() in ("file", "s3"):
            raise UriRefused(f"write the scheme as {m.group(1).lower()}:// (lower case)")
        if m and len(m.group(1)) > 1:
            raise UriRefused(f"scheme {m.group(1)!r} is not file:// or s3://")
        raise UriRefused("it is not absolute (give file:///…, /… or s3://…)")
    _segments(path[1:])
    try:
        resolved = Path(path).resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop, a name too long
        raise UriRefused(f"it cannot be resolved ({exc})") from None
    return Location("file", "", tuple(p for p in str(resolved).split("/") if p))


def root_location(root: str) -> Location:
    """A root the spec or the settings declare (a trailing '/' is fine), by the same rules."""
    trimmed = root.rstrip("/") if isinstance(root, str) else root
    try:
        if trimmed in ("", "file:", "file://"):
            raise UriRefused("it is the whole file system: name a folder")
        loc = parse(trimmed, folder=True)
        if loc.scheme == "file" and not loc.parts:
            raise UriRefused("it is the whole file system: name a folder")
    except UriRefused as exc:
        raise UriRefused(f"root {root!r} cannot be used: {exc}") from None
    return loc


def confine(
    uri: str,
    roots: Sequence[str],
    *,
    what: str,
    where: str,
    hint: str,
    exact: Sequence[str] = (),
) -> str:
    """The canonical URI of ``uri`` if it lies inside one of the folders ``roots`` or is one
    of ``exact``; else UriRefused naming the URI, why, the allowed roots and ``hint``.

    ``what`` names the thing (``batch``), ``where`` the roots in words (``model 'x''s landing
    prefix and allowed sources``), ``hint`` what to do instead."""
    allowed = [root_location(r) for r in roots]
    exactly = [root_location(e) for e in exact]
    shown = [loc.uri for loc in allowed] + [loc.uri for loc in exactly]
    try:
        loc = parse(uri)
    except UriRefused as exc:
        raise UriRefused(
            f"{what} {uri!r} is refused: {exc}; it must lie inside {where} {shown}. {hint}"
        ) from None
    if any(loc.within(r) for r in allowed) or loc in exactly:
        return loc.uri
    note = ""
    if loc.scheme == "file" and storage.file_uri(Path(uri.removeprefix("file://"))) != loc.uri:
        note = f" (it resolves to {loc.uri})"
    raise UriRefused(f"{what} {uri!r} is refused: it is outside {where} {shown}{note}. {hint}")


def within(uri: str, root: str) -> bool:
    """Whether ``uri`` is a readable URI inside the folder ``root``, by :func:`confine`'s rules."""
    try:
        return parse(uri).within(root_location(root))
    except UriRefused:
        return False


# -- a model's roots -------------------------------------------------------------------------


def landing_root(spec: ModelSpec | None = None) -> str:
    return storage.join(get_settings().storage_root, (spec or active()).landing_prefix)


def batch_roots(spec: ModelSpec | None = None) -> list[str]:
    """The landing prefix under the storage root, and the spec's ``landing.allowed_sources``."""
    spec = spec or active()
    return [landing_root(spec)] + [get_settings().resolve(a) for a in spec.landing.allowed_sources]


def trusted_roots(spec: ModelSpec | None = None) -> list[str]:
    """The spec's trusted prefix (``evaluation.trusted_prefix``; default ``trusted/``)."""
    return [get_settings().resolve((spec or active()).trusted_prefix)]


def location_uri(location: str) -> str:
    """A spec-style location as a URI: a URI or an absolute path as written (not normalised:
    :func:`confine` judges it as given), else a path relative to the storage root."""
    if not isinstance(location, str) or "://" in location or location.startswith("/"):
        return location
    return f"{get_settings().storage_root}/{location}"


def batch_source(uri: str, spec: ModelSpec | None = None) -> str:
    """A batch URI, confined to the model's landing prefix and allowed sources."""
    spec = spec or active()
    return confine(
        uri,
        batch_roots(spec),
        what="batch",
        where=f"model {spec.name!r}'s landing prefix and allowed sources",
        hint=f"Land it with `python -m pipeline data land --model {spec.name} --file PATH`, "
        f"or the model's owner adds its folder to landing.allowed_sources in {spec.path}.",
    )


def eval_source(location: str, spec: ModelSpec | None = None) -> str:
    """An evaluation set (a location relative to the storage root, or a URI), confined to
    the spec's own ``evaluation.uri`` and the folder of its trusted prefix."""
    spec = spec or active()
    return confine(
        location_uri(location),
        trusted_roots(spec),
        exact=[get_settings().resolve(spec.eval_location)],
        what="evaluation set",
        where=f"model {spec.name!r}'s evaluation.uri and trusted prefix",
        hint="A set a run names must be one the data owners put there "
        f"(`python -m pipeline data land --model {spec.name} --file eval.parquet --as-eval`); "
        f"the model's owner sets evaluation.uri / evaluation.trusted_prefix in {spec.path}.",
    )
