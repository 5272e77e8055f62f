"""Checkpoint signing keys (pipeline/signing.py): a verifier holds only public keys and so
cannot forge; the keyring rotates keys by id; every unsafe key is refused, naming its
setting and how to make a good one."""

from __future__ import annotations

import base64
import json
import secrets
import stat

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pipeline import signing
from pipeline.settings import get_settings

SIGNING_VARS = (
    "PIPELINE_SIGNING_KEY",
    "PIPELINE_SIGNING_KEY_ID",
    "PIPELINE_SIGNING_PUBLIC_KEYS",
    "PIPELINE_SIGNING_LEGACY_HMAC_KEY",
)


@pytest.fixture(autouse=True)
def env(pipeline_home, monkeypatch):
    """Nothing signing-related from the outer environment; settings re-read per change."""
    for var in SIGNING_VARS:
        monkeypatch.delenv(var, raising=False)

    def set_env(**values: str) -> None:
        for name, value in values.items():
            monkeypatch.setenv(f"PIPELINE_SIGNING_{name}", value)
        get_settings.cache_clear()

    yield set_env
    get_settings.cache_clear()


def pem(key: Ed25519PrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def public_pem(key: Ed25519PrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def entry(key_id: str, key: Ed25519PrivateKey) -> str:
    return signing.keyring_entry(key_id, key.public_key())


A, B = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
DATA = b'{"format": "retrain-checkpoint/1"}'


# -- what a verifier can and cannot do ----------------------------------------------------------


def test_verifier_with_only_public_keys_cannot_forge_under_a_trusted_id(env):
    env(PUBLIC_KEYS=entry("prod-1", A))
    ring = signing.configured_keyring()
    genuine = signing.Signer("prod-1", A, "test").sign(DATA)
    assert ring.check(DATA, genuine) == (None, "Ed25519", "prod-1")
    forged = signing.Signer("prod-1", B, "attacker").sign(DATA)  # any key, the trusted id
    problem, _, _ = ring.check(DATA, forged)
    assert "does not verify with trusted key 'prod-1'" in problem
    with pytest.raises(signing.SigningKeyError, match="PIPELINE_SIGNING_KEY is not set"):
        signing.configured_signer()  # a verifier has nothing to sign with...
    assert not (get_settings().home_dir / "keys").exists()  # ...and none is made for it


def test_tampered_data_and_unknown_key_id_are_refused(env):
    env(PUBLIC_KEYS=f"prod-1={entry('x', A).split('=', 1)[1]},prod-2={entry('x', B)[2:]}")
    ring = signing.configured_keyring()
    sig = signing.Signer("prod-1", A, "test").sign(DATA)
    assert "does not verify" in ring.check(DATA + b" ", sig)[0]
    stranger = signing.Signer("ops-9", Ed25519PrivateKey.generate(), "test").sign(DATA)
    problem = ring.check(DATA, stranger)[0]
    assert "signed by key 'ops-9', which is not trusted" in problem
    assert "['prod-1', 'prod-2']" in problem and "PIPELINE_SIGNING_PUBLIC_KEYS" in problem


def test_rotation_old_key_verifies_while_trusted_and_not_after_removal(env):
    old = signing.Signer("k-2024", A, "test").sign(DATA)
    env(PUBLIC_KEYS=f"{entry('k-2024', A)} {entry('k-2025', B)}")
    assert signing.configured_keyring().check(DATA, old)[0] is None
    env(PUBLIC_KEYS=entry("k-2025", B))
    problem = signing.configured_keyring().check(DATA, old)[0]
    assert "'k-2024', which is not trusted" in problem and "['k-2025']" in problem


def test_keyring_as_folder_of_pub_files_or_file_of_lines(env, tmp_path):
    folder = tmp_path / "ring"
    folder.mkdir()
    (folder / "k1.pub").write_text(public_pem(A))
    (folder / "k2.pub").write_text(entry("ignored", B).split("=", 1)[1] + "\n")
    env(PUBLIC_KEYS=str(folder))
    assert sorted(signing.configured_keyring().keys) == ["k1", "k2"]
    lines = tmp_path / "ring.txt"
    lines.write_text(f"# trusted\n{entry('k1', A)}\n\n{entry('k2', B)}\n")
    env(PUBLIC_KEYS=str(lines))
    ring = signing.configured_keyring()
    assert ring.check(DATA, signing.Signer("k2", B, "t").sign(DATA))[0] is None
    (folder / "k3.key").write_text(pem(B))  # a private key next to the public ones
    env(PUBLIC_KEYS=str(folder))
    with pytest.raises(signing.SigningKeyError, match=r"private key file\(s\) \['k3.key'\]"):
        signing.configured_keyring()


def test_signer_from_settings_and_the_keyring_it_must_be_in(env):
    env(KEY=pem(A))  # no id, no keyring: id from the fingerprint, its own key trusted
    s = signing.configured_signer()
    assert s.key_id == "ed25519-" + signing.fingerprint(A.public_key())[:12]
    assert signing.configured_keyring().check(DATA, s.sign(DATA))[0] is None
    one_line = "".join(pem(A).split("\n")[1:2])  # the PEM's base64 body line
    env(KEY=one_line, KEY_ID="prod-1", PUBLIC_KEYS=entry("prod-1", A))
    assert json.loads(signing.configured_signer().sign(DATA))["key_id"] == "prod-1"
    env(PUBLIC_KEYS=entry("prod-1", B))  # the same id, another key: would never verify
    with pytest.raises(signing.SigningKeyError, match="not trusted by PIPELINE_SIGNING_PUBLIC"):
        signing.configured_signer()


def test_embedded_default_makes_one_local_pair_under_pipeline_home(env):
    signer = signing.configured_signer()
    keys = get_settings().home_dir / "keys"
    private, public = keys / signing.LOCAL_PRIVATE, keys / signing.LOCAL_PUBLIC
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert "PRIVATE KEY" in private.read_text() and "PUBLIC KEY" in public.read_text()
    assert signer.key_id.startswith("local-")
    assert signing.configured_signer().key_id == signer.key_id  # made once
    ring = signing.configured_keyring()
    assert list(ring.keys) == [signer.key_id] and "embedded default" in ring.source


def test_scoring_service_refuses_to_hold_the_private_key(env, monkeypatch):
    env(KEY=pem(A), PUBLIC_KEYS=entry("ed", A))
    with pytest.raises(signing.SigningKeyError, match="PIPELINE_SIGNING_KEY is set in the scor"):
        signing.verifier_startup_check(serving=True)
    monkeypatch.delenv("PIPELINE_SIGNING_KEY")
    get_settings.cache_clear()
    assert "['ed'] from PIPELINE_SIGNING_PUBLIC_KEYS" in signing.verifier_startup_check(
        serving=True
    )


def test_keys_generate_writes_a_0600_private_key_and_never_overwrites(tmp_path, capsys):
    from pipeline.cli import main

    assert main(["keys", "generate", "--out", str(tmp_path / "k"), "--key-id", "prod-1"]) == 0
    out = capsys.readouterr().out
    private, public = tmp_path / "k" / "prod-1.key", tmp_path / "k" / "prod-1.pub"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600 and "PUBLIC KEY" in public.read_text()
    key = signing.parse_private_key(private.read_text())
    assert private.read_text() not in out  # the private key is never printed
    line = next(ln.strip() for ln in out.splitlines() if "PIPELINE_SIGNING_PUBLIC_KEYS=" in ln)
    ring = signing.parse_keyring(line.split("=", 1)[1])
    assert ring["prod-1"].public_bytes_raw() == key.public_key().public_bytes_raw()
    with pytest.raises(
        signing.SigningKeyError, match=r"holds private key file\(s\) \['prod-1.key'\]"
    ):
        signing.parse_keyring(str(tmp_path / "k"))  # that folder is not for verifiers
    again = ["keys", "generate", "--out", str(tmp_path / "k"), "--key-id", "prod-1"]
    assert main(again) == 2
    assert "never overwritten" in capsys.readouterr().err
    kept = signing.parse_private_key(private.read_text())  # the first key stands
    assert kept.public_key().public_bytes_raw() == key.public_key().public_bytes_raw()


# -- unsafe keys are refused, naming the setting ------------------------------------------------


def _ec_pem() -> str:
    return (
        ec.generate_private_key(ec.SECP256R1())
        .private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        .decode()
    )


def _encrypted_pem() -> str:
    return A.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw-pw-pw-pw"),
    ).decode()


GARBAGE_PEM = "-----BEGIN PRIVATE KEY-----\nnot!base64@@\n-----END PRIVATE KEY-----\n"
WEAK = Ed25519PrivateKey.from_private_bytes(bytes(32))
PRIVATE_CASES = [
    ("empty", "", "is set but empty"),
    ("placeholder", "change-me-pipeline-signing-key", "is a placeholder ('change-me')"),
    ("8-byte HMAC", "a1b2c3d4", "PIPELINE_SIGNING_LEGACY_HMAC_KEY"),
    ("old 32-byte HMAC", "9f" * 32, "looks like an HMAC key from before Ed25519"),
    ("public key given", public_pem(A), "holds a public key, but signing needs the private"),
    ("garbage PEM", GARBAGE_PEM, "is not an Ed25519 private key"),
    (
        "valid base64, not a key",
        "-----BEGIN PRIVATE KEY-----AAAA-----END PRIVATE KEY-----",
        "is not",
    ),
    ("EC key", _ec_pem(), "not an Ed25519 key"),
    ("encrypted", _encrypted_pem(), "encrypted"),
    ("OpenSSH block", GARBAGE_PEM.replace(" PRIVATE", " OPENSSH PRIVATE"), "'OPENSSH PRIVATE KEY'"),
    ("all-zero seed", pem(WEAK), "weak key"),
]


@pytest.mark.parametrize(
    ("value", "expected"), [pytest.param(v, e, id=i) for i, v, e in PRIVATE_CASES]
)
def test_unsafe_private_keys_are_refused_naming_the_setting(env, value, expected):
    env(KEY=value)
    with pytest.raises(signing.SigningKeyError) as err:
        signing.configured_signer()
    msg = str(err.value)
    assert msg.startswith("PIPELINE_SIGNING_KEY ") and expected in msg, msg
    assert "python -m pipeline keys generate --out DIR --key-id ID" in msg
    assert not (get_settings().home_dir / "keys").exists()  # never a silent local key instead


B64_PRIVATE_BODY = "".join(pem(B).split("\n")[1:2])
KEYRING_CASES = [
    ("empty", " ", "is set but empty"),
    ("placeholder", "compose=change-me-run-keys-generate", "placeholder"),
    ("README placeholder", "<id>=<base64>", "placeholder"),
    ("garbage base64", "k1=not!base64", "is not an Ed25519 public key"),
    ("wrong length", "k1=" + base64.b64encode(bytes(range(16))).decode(), "not an Ed25519 public"),
    ("all-zero key", "k1=" + base64.b64encode(bytes(32)).decode(), "not a real public key"),
    ("private key body", "k1=" + B64_PRIVATE_BODY, "holds a PRIVATE key"),
    ("private key PEM", "k1=" + pem(B), "holds a PRIVATE key"),
    ("bad key id", "bad/id=" + entry("x", A)[2:], "key id"),
    ("same id twice", f"k1={entry('x', A)[2:]},k1={entry('x', B)[2:]}", "twice"),
    ("missing path", "/nonexistent/keyring", "neither ID=BASE64 entries nor an existing path"),
]


@pytest.mark.parametrize(
    ("value", "expected"), [pytest.param(v, e, id=i) for i, v, e in KEYRING_CASES]
)
def test_unsafe_keyrings_are_refused_naming_the_setting(env, value, expected):
    env(PUBLIC_KEYS=value)
    with pytest.raises(signing.SigningKeyError) as err:
        signing.configured_keyring()
    msg = str(err.value)
    assert msg.startswith("PIPELINE_SIGNING_PUBLIC_KEYS") and expected in msg, msg
    assert not (get_settings().home_dir / "keys").exists()


LEGACY_CASES = [
    ("8-byte HMAC", "a1b2c3d4", "is 8 bytes: an HMAC key needs at least 32"),
    ("placeholder", "change-me-pipeline-signing-key-00000000", "placeholder"),
    ("little variety", "ab" * 20, "weak key"),
    ("a PEM key", pem(A), "holds a PEM key"),
]


@pytest.mark.parametrize(
    ("value", "expected"), [pytest.param(v, e, id=i) for i, v, e in LEGACY_CASES]
)
def test_weak_legacy_hmac_keys_are_refused(env, value, expected):
    env(PUBLIC_KEYS=entry("k1", A), LEGACY_HMAC_KEY=value)
    with pytest.raises(signing.SigningKeyError) as err:
        signing.configured_keyring()
    msg = str(err.value)
    assert msg.startswith("PIPELINE_SIGNING_LEGACY_HMAC_KEY") and expected in msg, msg


def test_legacy_hmac_is_off_by_default_and_when_empty(env):
    env(PUBLIC_KEYS=entry("k1", A), LEGACY_HMAC_KEY="")
    ring = signing.configured_keyring()
    assert ring.legacy_hmac is None and "legacy" not in ring.describe()
    env(LEGACY_HMAC_KEY=secrets.token_hex(32))
    assert "legacy HMAC-SHA256 signatures accepted" in signing.configured_keyring().describe()
