"""Signed artifacts: a signature over ``manifest.json``, which holds the sha256 of every other file.

``manifest.sha256`` only proves that nothing changed *by accident*: anyone can edit a file, re-hash the
manifest and recompute the digest. A signature makes the artifact tamper-evident for whoever holds the
public key:

- ``edgetl export --sign-key KEY.pem`` records ``integrity`` in the manifest (the algorithm and the
  fingerprint of the public key), then signs the exact bytes of ``manifest.json`` and writes the raw
  signature to ``manifest.sig``. Ed25519 keys (``openssl genpkey -algorithm ed25519``) sign with
  Ed25519; ECDSA P-256 keys with ECDSA over SHA-256 (a DER signature). An encrypted key takes its
  passphrase from ``$EDGETL_SIGN_PASSPHRASE``.
- ``edgetl validate --verify-key KEY.pub`` (and ``predict``) checks the signature over the manifest's
  bytes first, then every file against the verified manifest: a changed file, a re-hashed manifest,
  a missing or invalid signature, or another key fails with one line.
- Without a key, an artifact says what it is: ``checksummed, not signed``, or ``signed by sha256:...,
  not verified: pass --verify-key``.

The key fingerprint is the sha256 of the public key's DER SubjectPublicKeyInfo, the same as
``openssl pkey -pubin -in KEY.pub -outform DER | sha256sum``. An Ed25519 signature can be checked
without edgetl: ``openssl pkeyutl -verify -pubin -inkey KEY.pub -rawin -in manifest.json -sigfile
manifest.sig``.

``cryptography`` is imported only when a key is loaded or a signature verified, so ``edgetl --help``
and unsigned artifacts do not pay for it. No message ever holds key material.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgetl._io import atomic_write_bytes
from edgetl.errors import ArtifactError, ConfigError
from edgetl.export import bundle

SIGNATURE_FILE = bundle.SIGNATURE_FILE
PASSPHRASE_ENV = "EDGETL_SIGN_PASSPHRASE"
NOT_SIGNED = "checksummed, not signed"
ED25519 = "ed25519"
ECDSA_P256 = "ecdsa-p256-sha256"
_MAX_KEY_BYTES = 64 * 1024
_MAKE_KEY = "openssl genpkey -algorithm ed25519 -out signing.pem"


@dataclass(frozen=True)
class Signer:
    """A loaded private key: its algorithm and the fingerprint of its public key (never the key itself)."""

    key: Any
    algorithm: str
    fingerprint: str

    def __repr__(self) -> str:  # keep the key object out of logs and tracebacks
        return f"Signer({self.algorithm}, {self.fingerprint})"

    def sign(self, data: bytes) -> bytes:
        """The signature of ``data``."""
        if self.algorithm == ED25519:
            return self.key.sign(data)
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec

        return self.key.sign(data, ec.ECDSA(hashes.SHA256()))


def short(fingerprint: str) -> str:
    """``sha256:`` and the first 16 hex digits of a fingerprint, for messages."""
    return fingerprint[: len("sha256:") + 16] + "…" if fingerprint.startswith("sha256:") else fingerprint


# --- keys ----------------------------------------------------------------------------------------


def _crypto() -> None:
    try:
        import cryptography  # noqa: F401
    except ImportError:
        raise ConfigError("signing needs the cryptography package: pip install cryptography") from None


def _read_pem(path: str | os.PathLike[str], flag: str) -> bytes:
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"{flag} {path} does not exist; make a key pair with `{_MAKE_KEY}` and "
                          "`openssl pkey -in signing.pem -pubout -out signing.pub`")
    if path.stat().st_size > _MAX_KEY_BYTES:
        raise ConfigError(f"{flag} {path} is too large to be a PEM key")
    data = path.read_bytes()
    if b"-----BEGIN " not in data:
        raise ConfigError(f"{flag} {path} is not a PEM key (no -----BEGIN line); make one with `{_MAKE_KEY}`")
    return data


def _algorithm(key: Any, flag: str, path: Any) -> str:
    """``ed25519`` or ``ecdsa-p256-sha256`` for a private or public key; any other type is refused."""
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    if isinstance(key, (ed25519.Ed25519PrivateKey, ed25519.Ed25519PublicKey)):
        return ED25519
    is_ec = isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey))
    if is_ec and isinstance(key.curve, ec.SECP256R1):
        return ECDSA_P256
    kind = f"ECDSA {key.curve.name}" if is_ec else type(key).__name__.strip("_")
    raise ConfigError(f"{flag} {path} is not an Ed25519 or ECDSA P-256 key ({kind}); edgetl signs with those only: "
                      f"`{_MAKE_KEY}`")


def fingerprint(public_key: Any) -> str:
    """``sha256:`` and the hex sha256 of the public key's DER SubjectPublicKeyInfo."""
    from cryptography.hazmat.primitives import serialization

    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return "sha256:" + hashlib.sha256(der).hexdigest()


def load_signer(path: str | os.PathLike[str] | None, flag: str = "--sign-key") -> Signer | None:
    """Load the private key of ``--sign-key`` (None: no signing); ``flag`` names it in errors.

    Raises:
        ConfigError: a missing file, a public key, a key of another type, an encrypted key without
            ``$EDGETL_SIGN_PASSPHRASE`` or with a wrong one; one line, without the key's content.
    """
    if path is None:
        return None
    data = _read_pem(path, flag)
    if b"PUBLIC KEY-----" in data and b"PRIVATE KEY-----" not in data:
        raise ConfigError(f"{flag} {path} is a public key; --sign-key takes the private key "
                          "(--verify-key takes the public one)")
    _crypto()
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    encrypted = b"ENCRYPTED" in data
    passphrase = os.environ.get(PASSPHRASE_ENV)
    if encrypted and not passphrase:
        raise ConfigError(f"{flag} {path} is encrypted; set ${PASSPHRASE_ENV} to its passphrase")
    try:
        key = serialization.load_pem_private_key(data, password=passphrase.encode() if encrypted else None)
    except UnsupportedAlgorithm:
        raise ConfigError(f"{flag} {path} is a key of a type edgetl does not sign with; `{_MAKE_KEY}`") from None
    except (ValueError, TypeError):
        why = f"wrong ${PASSPHRASE_ENV}, or not" if encrypted else "not"
        raise ConfigError(f"{flag} {path} could not be read ({why} a PEM private key); `{_MAKE_KEY}`") from None
    algorithm = _algorithm(key, flag, path)
    return Signer(key, algorithm, fingerprint(key.public_key()))


def load_public_key(path: str | os.PathLike[str], flag: str = "--verify-key") -> tuple[Any, str, str]:
    """Load the public key of ``--verify-key``: ``(key, algorithm, fingerprint)``; ``flag`` names it in errors.

    Raises:
        ConfigError: a missing file, a private key, or not an Ed25519 / ECDSA P-256 public key.
    """
    data = _read_pem(path, flag)
    if b"PRIVATE KEY-----" in data:
        raise ConfigError(f"{flag} {path} is a private key; pass the public key "
                          "(`openssl pkey -in signing.pem -pubout -out signing.pub`) and keep the private one secret")
    _crypto()
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    try:
        key = serialization.load_pem_public_key(data)
    except UnsupportedAlgorithm:
        raise ConfigError(f"{flag} {path} is a key of a type edgetl does not verify") from None
    except ValueError:
        raise ConfigError(f"{flag} {path} could not be read as a PEM public key") from None
    return key, _algorithm(key, flag, path), fingerprint(key)


# --- signing -------------------------------------------------------------------------------------


def integrity(signer: Signer | None) -> dict[str, Any]:
    """The manifest's ``integrity`` record: how the artifact is protected."""
    if signer is None:
        return {"status": NOT_SIGNED}
    return {"status": "signed", "algorithm": signer.algorithm, "key_fingerprint": signer.fingerprint,
            "signature_file": SIGNATURE_FILE, "signed": f"the bytes of {bundle.MANIFEST_FILE}"}


def sign_manifest(folder: str | os.PathLike[str], signer: Signer | None) -> None:
    """Sign ``manifest.json``'s bytes into ``manifest.sig`` (atomically); nothing without a signer."""
    if signer is None:
        return
    folder = Path(folder)
    atomic_write_bytes(folder / SIGNATURE_FILE, signer.sign((folder / bundle.MANIFEST_FILE).read_bytes()))


# --- verifying -----------------------------------------------------------------------------------


def describe(manifest: dict[str, Any], verified: bool | None = False) -> str:
    """One phrase for a report: ``checksummed, not signed``, or ``signed by sha256:… (ed25519)`` followed by
    ``, verified with --verify-key`` (``verified``), ``, not verified: pass --verify-key`` (not ``verified``),
    or nothing (None: as export wrote it)."""
    record = _record(manifest)
    if record.get("status") != "signed":
        return NOT_SIGNED
    who = f"signed by {short(str(record.get('key_fingerprint')))} ({record.get('algorithm')})"
    if verified is None:
        return who
    return f"{who}, verified with --verify-key" if verified else f"{who}, not verified: pass --verify-key"


def verify_artifact(folder: str | os.PathLike[str],
                    verify_key: str | os.PathLike[str] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Verify an artifact: with ``verify_key``, the signature over ``manifest.json`` first, then every file
    against that (verified) manifest; without, the files and the manifest's digest, as
    :func:`edgetl.export.bundle.verify_files` does.

    Returns:
        The manifest, and the integrity verdict (``status``, ``verified``, ``summary``, the key's fingerprint).

    Raises:
        ArtifactError: an unsigned artifact, another key, an invalid signature (a changed or re-hashed
            manifest), a missing ``manifest.sig``, or any file that does not match the manifest.
        ConfigError: a ``verify_key`` that is not an Ed25519 / ECDSA P-256 public key.
    """
    folder = Path(folder).expanduser()
    manifest = bundle.read_manifest(folder)
    if verify_key is not None:
        manifest = _verified_manifest(folder, manifest, verify_key)
    elif describe(manifest) != NOT_SIGNED and not (folder / SIGNATURE_FILE).is_file():
        raise ArtifactError(f"missing file {SIGNATURE_FILE} in {folder}: its manifest says it is signed; "
                            "re-export the artifact with --sign-key")
    manifest = bundle.verify_files(folder, manifest)
    record = _record(manifest)
    verdict = {"status": "signed" if describe(manifest) != NOT_SIGNED else NOT_SIGNED,
               "verified": verify_key is not None, "algorithm": record.get("algorithm"),
               "key_fingerprint": record.get("key_fingerprint"),
               "summary": describe(manifest, verified=verify_key is not None)}
    return manifest, verdict


def _verified_manifest(folder: Path, claimed: dict[str, Any], verify_key: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest parsed from the bytes the signature verifies (raises unless it does)."""
    key, algorithm, expected = load_public_key(verify_key)
    sig_path = folder / SIGNATURE_FILE
    record = _record(claimed)
    if not sig_path.is_file():
        said = "says it is signed" if record.get("status") == "signed" else f"says \"{describe(claimed)}\""
        raise ArtifactError(f"{folder} is not signed (no {SIGNATURE_FILE}; its manifest {said}), so --verify-key "
                            "cannot vouch for it; re-export it with --sign-key")
    if record.get("key_fingerprint") not in (None, expected):
        raise ArtifactError(f"{folder} is signed by another key ({short(str(record.get('key_fingerprint')))}), "
                            f"not by --verify-key {verify_key} ({short(expected)})")
    raw = (folder / bundle.MANIFEST_FILE).read_bytes()
    if not _valid(key, algorithm, sig_path.read_bytes(), raw):
        raise ArtifactError(
            f"the signature in {SIGNATURE_FILE} does not match {bundle.MANIFEST_FILE} of {folder} for --verify-key "
            f"{verify_key} ({short(expected)}): the manifest was changed (or re-hashed) after signing; "
            "do not use this artifact"
        )
    manifest = json.loads(raw)
    if not isinstance(manifest, dict) or _record(manifest).get("key_fingerprint") != expected:
        raise ArtifactError(f"{bundle.MANIFEST_FILE} of {folder} is signed but does not record the signing key; "
                            "re-export the artifact with --sign-key")
    return manifest


def _record(manifest: dict[str, Any]) -> dict[str, Any]:
    record = manifest.get("integrity")
    return record if isinstance(record, dict) else {}


def _valid(key: Any, algorithm: str, signature: bytes, data: bytes) -> bool:
    from cryptography.exceptions import InvalidSignature

    try:
        if algorithm == ED25519:
            key.verify(signature, data)
        else:
            from cryptography.hazmat.primitives import hashes
            from cryptography.hazmat.primitives.asymmetric import ec

            key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True
