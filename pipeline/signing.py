"""Checkpoint signing keys: an Ed25519 private key with the trainer, public keys everywhere else.

A checkpoint's ``manifest.sig`` is ``{"alg": "Ed25519", "key_id": ID, "sig": base64}`` over
the exact bytes of ``manifest.json``. Whoever verifies holds only public keys, so a verifier
(the gate, the scoring service) can no longer forge what it checks.

Settings (``pipeline/settings.py``, env prefix ``PIPELINE_``):

``PIPELINE_SIGNING_KEY``
    The trainer's Ed25519 private key: the PEM file's text (one line or several) or its
    base64 body line. Inside Airflow the Connection ``checkpoint_signing`` supplies it
    (password = the key, login or extra ``key_id`` = the id; ``dags/connections.py``).
    Verifiers never need it; the scoring service refuses to start holding it.
``PIPELINE_SIGNING_KEY_ID``
    The id written into each signature (default ``ed25519-`` + 12 hex characters of the public
    key's SHA-256). Letters, numbers and ``. _ : @ + -``, at most 100 characters.
``PIPELINE_SIGNING_PUBLIC_KEYS``
    The keyring: the public keys a verifier trusts, by id. A value containing ``=`` is an
    inline list ``ID=BASE64[,ID=BASE64 …]`` (comma or whitespace separated; BASE64 is the
    raw 32-byte key or the ``.pub`` file's body line). Any other value is a path: a folder
    of ``<ID>.pub`` files (PEM), or a file of ``ID=BASE64`` lines (``#`` comments).
``PIPELINE_SIGNING_LEGACY_HMAC_KEY``
    Off unless set (empty = off): also accept ``HMAC-SHA256`` signatures made with this key,
    i.e. checkpoints from before Ed25519, whose key was the old ``PIPELINE_SIGNING_KEY``.
    Meant for the time it takes ``python -m pipeline checkpoint resign <uri>`` to re-sign
    them; it is a shared secret, so keep it away from the scoring service.

Nothing set (the embedded default): a key pair is made once under ``$PIPELINE_HOME/keys/``
(``checkpoint-signing.ed25519.key``, mode 0600, and its ``.pub``), key id ``local-…``, and
its public key is the one trusted. With ``PIPELINE_SIGNING_PUBLIC_KEYS`` set no key is ever
made: a signer without ``PIPELINE_SIGNING_KEY`` is refused. With a private key and no
keyring, the key's own public key is the one trusted.

Rotation: make a new pair (``python -m pipeline keys generate --out DIR --key-id ID``), add
its public key to every keyring, then switch the trainer to it. Checkpoints signed by the
old key verify while its public key stays in the keyring (``checkpoint resign`` moves them
to the new key); once it is removed, they are refused, naming the trusted ids.

Every key is checked when it is first needed (and the scoring service checks its keyring
at startup): an empty, placeholder (``change-me…``), malformed, weak or wrong-kind key is
refused with a :class:`SigningKeyError` naming the setting and how to make a good one.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from pipeline.errors import PipelineRejection
from pipeline.settings import get_settings

ALG = "Ed25519"
LEGACY_ALG = "HMAC-SHA256"
KEY, KEY_ID, PUBLIC_KEYS, LEGACY_HMAC_KEY = (
    "PIPELINE_SIGNING_KEY",
    "PIPELINE_SIGNING_KEY_ID",
    "PIPELINE_SIGNING_PUBLIC_KEYS",
    "PIPELINE_SIGNING_LEGACY_HMAC_KEY",
)
GENERATE = "python -m pipeline keys generate --out DIR --key-id ID"
RESIGN = "python -m pipeline checkpoint resign <uri>"
LOCAL_PRIVATE, LOCAL_PUBLIC = "checkpoint-signing.ed25519.key", "checkpoint-signing.ed25519.pub"
LEGACY_LOCAL = "checkpoint-signing.key"  # the embedded default's HMAC key, before Ed25519
MIN_HMAC_BYTES = 32
MIN_DISTINCT_BYTES = 16  # of a 32-byte Ed25519 key; random keys have ~30
_KEY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+-]{0,99}")
_PLACEHOLDER = re.compile(
    r"change[-_ ]?me|replace[-_ ]?me|placeholder|your[-_ ]?(signing[-_ ]?)?key|<[^>]*>", re.I
)
_PEM = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----(.*?)-----END \1-----", re.S)
_MAKE_PAIR = (
    f"Make a key pair with `{GENERATE}`: the trainer gets ID.key ({KEY}), every verifier "
    f"the public key ({PUBLIC_KEYS}=ID=BASE64, printed by that command)."
)


class SigningKeyError(PipelineRejection):
    """A signing setting is missing, unsafe or malformed: nothing is signed or verified."""


def _refuse(setting: str, what: str, fix: str = _MAKE_PAIR) -> SigningKeyError:
    return SigningKeyError(f"{setting} {what}. {fix}")


def _usable(text: str, setting: str, fix: str = _MAKE_PAIR) -> str:
    """The stripped value, refused when empty or a placeholder."""
    t = text.strip()
    if not t:
        raise _refuse(setting, "is set but empty", fix)
    found = _PLACEHOLDER.search(t)
    if found:
        raise _refuse(setting, f"is a placeholder ({found.group(0)!r}), not a key", fix)
    return t


def _b64(text: str) -> bytes | None:
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        return None


def _der(text: str, label: str, setting: str) -> bytes | None:
    """The DER bytes of a PEM block (any line breaks, or none) or of a bare base64 body."""
    if "-----BEGIN" not in text:
        return _b64(text)
    m = _PEM.search(text)
    if m is None:
        return None
    if m.group(1) != label:
        hint = (
            "encrypted: give it unencrypted (the secret store protects it)"
            if m.group(1) == "ENCRYPTED PRIVATE KEY"
            else f"a {m.group(1)!r} PEM block, not {label!r} (PKCS#8 / SubjectPublicKeyInfo)"
        )
        raise _refuse(setting, f"is {hint}")
    return _b64(m.group(2))


def key_id_ok(key_id: str, setting: str) -> str:
    if not _KEY_ID.fullmatch(key_id):
        raise _refuse(
            setting,
            f"is {key_id!r}: a key id is 1-100 letters, numbers and . _ : @ + - "
            "(starting with a letter or number)",
            "Pick a short name, e.g. prod-2025-01.",
        )
    return key_id


def _raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def fingerprint(key: Ed25519PublicKey) -> str:
    """SHA-256 of the raw public key, hex."""
    return hashlib.sha256(_raw_public(key)).hexdigest()


def keyring_entry(key_id: str, key: Ed25519PublicKey) -> str:
    """``ID=BASE64``: one entry of ``PIPELINE_SIGNING_PUBLIC_KEYS``."""
    return f"{key_id}={base64.b64encode(_raw_public(key)).decode()}"


def parse_private_key(text: str, setting: str = KEY) -> Ed25519PrivateKey:
    """An Ed25519 private key from PEM text (PKCS#8, unencrypted) or its base64 body."""
    t = _usable(text, setting)
    if "PUBLIC KEY" in t:
        raise _refuse(
            setting,
            "holds a public key, but signing needs the private key (the ID.key file); public "
            f"keys belong in {PUBLIC_KEYS}",
        )
    der = _der(t, "PRIVATE KEY", setting)
    key = None
    if der is not None:
        try:
            key = serialization.load_der_private_key(der, password=None)
        except TypeError:
            raise _refuse(setting, "is encrypted: give it unencrypted") from None
        except (ValueError, UnsupportedAlgorithm):
            key = None
    if key is None:
        legacy = (
            ""
            if "-----BEGIN" in t
            else f" (a {len(t)}-character secret looks like an HMAC key from before Ed25519 "
            f"signatures: to keep verifying checkpoints signed with it, set it as "
            f"{LEGACY_HMAC_KEY} and re-sign them with `{RESIGN}`)"
        )
        raise _refuse(
            setting,
            "is not an Ed25519 private key: expected PEM 'BEGIN PRIVATE KEY' text or its "
            f"base64 body{legacy}",
        )
    if not isinstance(key, Ed25519PrivateKey):
        raise _refuse(setting, f"is a {type(key).__name__.lstrip('_')}, not an Ed25519 key")
    raw = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    if len(set(raw)) < MIN_DISTINCT_BYTES:
        raise _refuse(
            setting,
            f"is a weak key ({len(set(raw))} distinct bytes in 32): not randomly generated",
        )
    return key


def parse_public_key(text: str, setting: str = PUBLIC_KEYS, key_id: str = "") -> Ed25519PublicKey:
    """An Ed25519 public key from PEM, the PEM body, or base64 of the raw 32 bytes."""
    where = f"{setting} (key {key_id!r})" if key_id else setting
    t = _usable(text, where)
    if "PRIVATE KEY" in t:
        raise _refuse(
            where,
            "holds a PRIVATE key: verifiers get only public keys (the ID.pub file, or the "
            "ID=BASE64 line `keys generate` prints); this key is exposed, make a new pair",
        )
    der = _der(t, "PUBLIC KEY", where)
    key = None
    if der is not None and len(der) != 32:
        try:
            serialization.load_der_private_key(der, password=None)
        except (TypeError, ValueError, UnsupportedAlgorithm):
            pass
        else:
            raise _refuse(
                where,
                "holds a PRIVATE key (base64 PKCS#8): verifiers get only public keys; "
                "this key is exposed, make a new pair",
            )
    if der is not None:
        try:
            key = (
                Ed25519PublicKey.from_public_bytes(der)
                if len(der) == 32
                else serialization.load_der_public_key(der)
            )
        except (ValueError, UnsupportedAlgorithm):
            key = None
    if key is None:
        raise _refuse(
            where,
            "is not an Ed25519 public key: expected base64 of its 32 bytes, or PEM "
            "'BEGIN PUBLIC KEY' text",
        )
    if not isinstance(key, Ed25519PublicKey):
        raise _refuse(where, f"is a {type(key).__name__.lstrip('_')}, not an Ed25519 key")
    if len(set(_raw_public(key))) < MIN_DISTINCT_BYTES:
        raise _refuse(where, "is not a real public key (too few distinct bytes)")
    return key


def _entries(lines: list[str], setting: str) -> dict[str, Ed25519PublicKey]:
    ring: dict[str, Ed25519PublicKey] = {}
    for entry in lines:
        key_id, sep, value = entry.partition("=")
        if not sep:
            raise _refuse(setting, f"has an entry {entry[:40]!r} that is not ID=BASE64")
        key_id = key_id_ok(key_id.strip(), f"{setting} (an id)")
        key = parse_public_key(value, setting, key_id)
        if key_id in ring and _raw_public(ring[key_id]) != _raw_public(key):
            raise _refuse(setting, f"lists key id {key_id!r} twice, with different keys")
        ring[key_id] = key
    return ring


def parse_keyring(value: str, setting: str = PUBLIC_KEYS) -> dict[str, Ed25519PublicKey]:
    """Trusted public keys by id: inline ``ID=BASE64`` entries, a folder of ``<ID>.pub``
    files, or a file of ``ID=BASE64`` lines."""
    fix = (
        f"Give {PUBLIC_KEYS} as ID=BASE64[,ID=BASE64] (the line `{GENERATE}` prints), or the "
        "path of a folder of ID.pub files or of a file of ID=BASE64 lines; unset it only for "
        "the embedded default."
    )
    v = _usable(value, setting, fix)
    if "PRIVATE KEY" in v:
        raise _refuse(
            setting,
            "holds a PRIVATE key: verifiers get only public keys; this key is exposed, make "
            "a new pair",
            fix,
        )
    if "=" in v:
        ring = _entries(re.split(r"[\s,]+", v), setting)
    else:
        path = Path(v).expanduser()
        if path.is_dir():
            private = sorted(
                p.name
                for p in path.iterdir()
                if p.is_file()
                and (p.suffix == ".key" or "PRIVATE KEY" in p.read_text(errors="replace"))
            )
            if private:
                raise _refuse(
                    setting,
                    f"names folder {path}, which holds private key file(s) {private}: "
                    "verifiers get only the .pub files; move the private keys out",
                    fix,
                )
            ring = {
                key_id_ok(p.name[: -len(".pub")], f"{setting} ({p.name})"): parse_public_key(
                    p.read_text(), f"{setting} ({p})"
                )
                for p in sorted(path.glob("*.pub"))
            }
        elif path.is_file():
            text = path.read_text(errors="replace")
            if "-----BEGIN" in text:
                raise _refuse(
                    setting,
                    f"names file {path}, a PEM key: a keyring file lists ID=BASE64 lines "
                    "(for .pub files, give their folder)",
                    fix,
                )
            lines = [ln.strip() for ln in text.splitlines()]
            ring = _entries([ln for ln in lines if ln and not ln.startswith("#")], setting)
        else:
            raise _refuse(
                setting, f"is {v[:60]!r}: neither ID=BASE64 entries nor an existing path", fix
            )
    if not ring:
        raise _refuse(setting, "holds no public key", fix)
    return ring


def check_hmac_key(text: str, setting: str = LEGACY_HMAC_KEY) -> bytes:
    """A legacy HMAC key, refused when short, a placeholder or of little variety."""
    fix = (
        "It must be the exact HMAC key the old checkpoints were signed with (the "
        f"{KEY} of before Ed25519, or {LEGACY_LOCAL} under $PIPELINE_HOME/keys for the "
        "embedded default). A weak old key proves nothing: retrain instead of re-signing."
    )
    t = _usable(text, setting, fix)
    if "-----BEGIN" in t:
        raise _refuse(setting, "holds a PEM key, not the old HMAC secret", fix)
    if len(t.encode()) < MIN_HMAC_BYTES:
        raise _refuse(
            setting,
            f"is {len(t.encode())} bytes: an HMAC key needs at least {MIN_HMAC_BYTES} "
            "(e.g. `openssl rand -hex 32`)",
            fix,
        )
    if len(set(t)) < 8:
        raise _refuse(setting, f"is a weak key ({len(set(t))} distinct characters)", fix)
    return text.encode()


# -- signer ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Signer:
    key_id: str
    private_key: Ed25519PrivateKey = field(repr=False)
    source: str  # where the key came from, for messages

    def public_key(self) -> Ed25519PublicKey:
        return self.private_key.public_key()

    def sign(self, data: bytes) -> str:
        """The ``manifest.sig`` text: deterministic (Ed25519), so a retry writes the same."""
        sig = base64.b64encode(self.private_key.sign(data)).decode()
        return json.dumps({"alg": ALG, "key_id": self.key_id, "sig": sig})


def _create(path: Path, data: bytes, mode: int) -> bool:
    """Write ``path`` whole (temp file + link): a reader never sees half a key, an existing
    file is never replaced. False when it already existed."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), mode)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        return True
    finally:
        os.unlink(tmp)


def _pem(key: Ed25519PrivateKey) -> tuple[bytes, bytes]:
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, public


def generate_key_pair(out: Path, key_id: str) -> tuple[Path, Path, str]:
    """Write ``<out>/<key_id>.key`` (private, PEM, mode 0600) and ``<key_id>.pub``; return
    both paths and the keyring entry. Existing files are never overwritten."""
    key_id_ok(key_id, "--key-id")
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    private_path, public_path = out / f"{key_id}.key", out / f"{key_id}.pub"
    for p in (private_path, public_path):
        if p.exists():
            raise SigningKeyError(
                f"{p} exists: keys are never overwritten; a new key gets a new --key-id"
            )
    key = Ed25519PrivateKey.generate()
    private, public = _pem(key)
    if not _create(private_path, private, 0o600):
        raise SigningKeyError(f"{private_path} appeared while generating: not overwritten")
    _create(public_path, public, 0o644)
    return private_path, public_path, keyring_entry(key_id, key.public_key())


def local_signer(home: Path) -> Signer:
    """The embedded default's key pair under ``home/keys``, made on first use (0600)."""
    keys = home / "keys"
    private_path = keys / LOCAL_PRIVATE
    if not private_path.exists():
        keys.mkdir(parents=True, exist_ok=True, mode=0o700)
        private, _ = _pem(Ed25519PrivateKey.generate())
        _create(private_path, private, 0o600)  # False: another process made it first
    key = parse_private_key(private_path.read_text(), f"the local signing key {private_path}")
    public_path = keys / LOCAL_PUBLIC
    if not public_path.exists():
        _create(public_path, _pem(key)[1], 0o644)
    return Signer("local-" + fingerprint(key.public_key())[:8], key, str(private_path))


def configured_signer() -> Signer:
    """The key this process signs with: ``PIPELINE_SIGNING_KEY``, else (embedded default,
    no keyring configured) the local pair. Refused when unsafe, or when the keyring this
    process is given does not trust it (what it signed would not verify)."""
    s = get_settings()
    if s.signing_key is None:
        if s.signing_public_keys is not None:
            raise _refuse(
                KEY,
                f"is not set, and {PUBLIC_KEYS} is (so this is not the embedded default and "
                "no local key is made): this process cannot sign",
                f"Give the trainer its private key in {KEY} (or the Airflow Connection "
                f"checkpoint_signing); {_MAKE_PAIR}",
            )
        return local_signer(s.home_dir)
    key = parse_private_key(s.signing_key.get_secret_value(), KEY)
    key_id = s.signing_key_id.strip() or "ed25519-" + fingerprint(key.public_key())[:12]
    signer = Signer(key_id_ok(key_id, KEY_ID), key, KEY)
    if s.signing_public_keys is not None:
        ring = parse_keyring(s.signing_public_keys)
        trusted = ring.get(key_id)
        if trusted is None or _raw_public(trusted) != _raw_public(signer.public_key()):
            raise _refuse(
                KEY,
                f"(key id {key_id!r}) is not trusted by {PUBLIC_KEYS} (ids {sorted(ring)}"
                f"{', a different key under that id' if trusted is not None else ''}): "
                "what it signs would be refused",
                f"Add `{keyring_entry(key_id, signer.public_key())}` to {PUBLIC_KEYS} "
                f"everywhere, or fix {KEY_ID}.",
            )
    return signer


# -- verifier -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Keyring:
    keys: dict[str, Ed25519PublicKey]
    source: str  # where the keys came from, for messages
    legacy_hmac: bytes | None = field(default=None, repr=False)
    legacy_hint: str = ""

    def describe(self) -> str:
        legacy = (
            f"; legacy {LEGACY_ALG} signatures accepted ({LEGACY_HMAC_KEY}: a shared secret "
            f"in this process; re-sign with `{RESIGN}` and unset it)"
            if self.legacy_hmac is not None
            else ""
        )
        return f"trusting {ALG} key(s) {sorted(self.keys)} from {self.source}{legacy}"

    def check(self, data: bytes, signature: str) -> tuple[str | None, str, str]:
        """(problem or None, alg, key id) for a ``manifest.sig`` text over ``data``."""
        try:
            sig = json.loads(signature)
        except json.JSONDecodeError:
            return "signature file is not valid JSON", "", ""
        if not isinstance(sig, dict):
            return "signature file is not a JSON object", "", ""
        alg, key_id = str(sig.get("alg", "")), str(sig.get("key_id", ""))
        if alg == ALG:
            public = self.keys.get(key_id)
            if public is None:
                return (
                    f"signed by key {key_id!r}, which is not trusted ({self.source} trusts "
                    f"{sorted(self.keys)}): a key removed from the keyring, or never in it",
                    alg,
                    key_id,
                )
            raw = _b64(str(sig.get("sig", "")))
            try:
                public.verify(raw or b"", data)
            except InvalidSignature:
                return (
                    f"signature does not verify with trusted key {key_id!r} ({ALG}): "
                    f"manifest edited after signing, or signed by a key that is not the one "
                    f"trusted as {key_id!r}",
                    alg,
                    key_id,
                )
            return None, alg, key_id
        if alg == LEGACY_ALG:
            if self.legacy_hmac is None:
                return (
                    f"signed with a legacy {LEGACY_ALG} key ({key_id!r}), not trusted by "
                    f"default: re-sign it with `{RESIGN}`, run with {LEGACY_HMAC_KEY} set to "
                    f"the old HMAC key{self.legacy_hint} (or set {LEGACY_HMAC_KEY} to keep "
                    "accepting such signatures)",
                    alg,
                    key_id,
                )
            expected = hmac.new(self.legacy_hmac, data, hashlib.sha256).hexdigest()
            if not hmac.compare_digest(expected, str(sig.get("mac", ""))):
                return (
                    f"signature does not verify with {LEGACY_HMAC_KEY} ({LEGACY_ALG}, signed "
                    f"with {key_id!r}): manifest edited after signing, or another HMAC key",
                    alg,
                    key_id,
                )
            return None, alg, key_id
        return (
            f"unsupported signature algorithm {alg!r} (verified here: {ALG}; {LEGACY_ALG} "
            f"with {LEGACY_HMAC_KEY})",
            alg,
            key_id,
        )


def configured_keyring() -> Keyring:
    """What this process trusts: ``PIPELINE_SIGNING_PUBLIC_KEYS``; else the public key of
    ``PIPELINE_SIGNING_KEY``; else (embedded default) the local pair's. Plus the legacy
    HMAC key when ``PIPELINE_SIGNING_LEGACY_HMAC_KEY`` is set."""
    s = get_settings()
    legacy_value = s.signing_legacy_hmac_key.get_secret_value() if s.signing_legacy_hmac_key else ""
    legacy = check_hmac_key(legacy_value) if legacy_value.strip() else None
    old_local = s.home_dir / "keys" / LEGACY_LOCAL
    hint = (
        f" (the embedded default's old key is the content of {old_local})"
        if (old_local.is_file())
        else ""
    )
    if s.signing_public_keys is not None:
        return Keyring(parse_keyring(s.signing_public_keys), PUBLIC_KEYS, legacy, hint)
    signer = configured_signer()
    source = (
        f"{KEY}'s own public key (no {PUBLIC_KEYS} set)"
        if signer.source == KEY
        else f"the embedded default's local key pair {signer.source} (no {PUBLIC_KEYS} set)"
    )
    return Keyring({signer.key_id: signer.public_key()}, source, legacy, hint)


def verifier_startup_check(*, serving: bool = False) -> str:
    """Read and check the verifying side's keys now, so that a bad keyring stops a service
    at startup rather than refusing models later; the scoring service (``serving``) must
    not hold the private key. Returns what is trusted, for the log."""
    s = get_settings()
    if serving and s.signing_key is not None:
        raise _refuse(
            KEY,
            "is set in the scoring service: it only verifies, and a private key there lets "
            "whoever reaches it sign checkpoints",
            f"Remove {KEY} from the service; give it only {PUBLIC_KEYS}.",
        )
    return configured_keyring().describe()
