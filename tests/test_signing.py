"""Signed artifacts: ``export --sign-key`` signs the manifest, ``validate``/``predict --verify-key`` check it.

The round trip and the attacker's forgery (one byte of model.onnx flipped, the manifest re-hashed and its
digest recomputed, as anyone can without the key) run through the real command line in fresh processes;
the other refusals run the same click commands in this process.
"""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from clirun import edgetl_cli
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from PIL import Image

import edgetl
from edgetl.cli import cli
from edgetl.errors import ArtifactError, ConfigError
from edgetl.export import bundle, signing

FAST = ["--iterations", "3", "--warmup", "1"]
TINY = ["--weights", "none", "--resolution", "32", "--precision", "fp32", "--rounds", "2", "--no-simplify"]


def _write_key(folder: Path, name: str, key, passphrase: bytes | None = None) -> tuple[Path, Path]:
    crypt = serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
    private = folder / f"{name}.pem"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, crypt))
    public = folder / f"{name}.pub"
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    return {
        "ed": _write_key(folder, "signing", ed25519.Ed25519PrivateKey.generate()),
        "other": _write_key(folder, "other", ed25519.Ed25519PrivateKey.generate()),
        "p256": _write_key(folder, "p256", ec.generate_private_key(ec.SECP256R1())),
        "p384": _write_key(folder, "p384", ec.generate_private_key(ec.SECP384R1())),
        "locked": _write_key(folder, "locked", ed25519.Ed25519PrivateKey.generate(), passphrase=b"s3cret"),
    }


@pytest.fixture(scope="module")
def signed(keys, tmp_path_factory):
    """A tiny FP32 artifact exported and signed through the real CLI."""
    out = tmp_path_factory.mktemp("signed") / "artifact"
    proc = edgetl_cli("export", "resnet18", *TINY, "--device", "x86", "--out", out, "--sign-key", keys["ed"][0])
    assert proc.returncode == 0, proc.stderr
    assert "integrity: signed by sha256:" in proc.stdout
    return out


@pytest.fixture(scope="module")
def unsigned(tmp_path_factory):
    out = tmp_path_factory.mktemp("unsigned") / "artifact"
    return edgetl.export("resnet18", out, precision="fp32", weights="none", resolution=32, rounds=2,
                         simplify=False, device="x86").path


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "grey.png"
    Image.new("RGB", (40, 48), (120, 130, 140)).save(path)
    return path


def _copy(src: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "artifact"
    shutil.copytree(src, dest)
    (dest / bundle.VALIDATION_FILE).unlink(missing_ok=True)
    return dest


def _rehash(folder: Path) -> None:
    """What an attacker without the key does after changing a file: re-hash it into the manifest and
    recompute the manifest's digest, so every checksum matches again."""
    manifest = json.loads((folder / bundle.MANIFEST_FILE).read_text())
    manifest["files"] = {name: bundle.file_record(folder / name) for name in manifest["files"]}
    (folder / bundle.MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    (folder / bundle.DIGEST_FILE).write_text(bundle.manifest_digest(manifest) + "\n")


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _one_error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def _invoke(*args):
    return CliRunner().invoke(cli, list(map(str, args)))


def test_signed_round_trip_through_the_cli(signed, keys, image):
    manifest = json.loads((signed / bundle.MANIFEST_FILE).read_text())
    public = signing.load_public_key(keys["ed"][1])
    assert manifest["integrity"] == {"status": "signed", "algorithm": "ed25519", "key_fingerprint": public[2],
                                     "signature_file": "manifest.sig", "signed": "the bytes of manifest.json"}
    assert (signed / "manifest.sig").is_file() and "manifest.sig" not in manifest["files"]
    if shutil.which("openssl"):  # the signature is plain Ed25519 over the file's bytes: firmware can check it too
        check = subprocess.run(["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", keys["ed"][1], "-rawin",
                                "-in", signed / "manifest.json", "-sigfile", signed / "manifest.sig"],
                               capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr

    proc = edgetl_cli("validate", signed, *FAST, "--verify-key", keys["ed"][1])
    assert proc.returncode == 0, proc.stderr
    assert "verified with --verify-key" in proc.stdout
    report = json.loads((signed / bundle.VALIDATION_FILE).read_text())
    assert report["integrity"]["verified"] and report["integrity"]["key_fingerprint"] == public[2]

    got = edgetl.predict(signed, [image], top=1, verify_key=keys["ed"][1])
    assert len(got) == 1 and got[0].label


def test_a_flipped_byte_in_a_rehashed_artifact_fails_with_one_line(signed, keys, tmp_path):
    forged = _copy(signed, tmp_path)
    _flip(forged / bundle.MODEL_FILE)
    _rehash(forged)
    assert edgetl.validate(forged, iterations=2, warmup=0, write=False).passed  # every checksum matches again
    proc = edgetl_cli("validate", forged, *FAST, "--verify-key", keys["ed"][1])
    assert proc.returncode == 1
    line = _one_error_line(proc)
    assert "signature in manifest.sig does not match manifest.json" in line and "re-hashed" in line, line
    assert not (forged / bundle.VALIDATION_FILE).exists()  # nothing ran


def _tamper(case: str, folder: Path) -> None:
    if case == "file changed, not re-hashed":
        _flip(folder / bundle.LABELS_FILE)
    elif case == "signature changed":
        _flip(folder / signing.SIGNATURE_FILE)
    elif case == "signature removed":
        (folder / signing.SIGNATURE_FILE).unlink()
    elif case == "manifest edited":
        manifest = json.loads((folder / bundle.MANIFEST_FILE).read_text())
        manifest["precision_note"] = "edited"
        (folder / bundle.MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
        (folder / bundle.DIGEST_FILE).write_text(bundle.manifest_digest(manifest) + "\n")


@pytest.mark.parametrize(("case", "expected"), [
    ("file changed, not re-hashed", "sha256 mismatch for labels.json"),
    ("signature changed", "signature in manifest.sig does not match manifest.json"),
    ("signature removed", "is not signed (no manifest.sig; its manifest says it is signed)"),
    ("manifest edited", "signature in manifest.sig does not match manifest.json"),
])
def test_every_tampering_fails_validate_and_predict(signed, keys, image, tmp_path, case, expected):
    folder = _copy(signed, tmp_path)
    _tamper(case, folder)
    for argv in (["validate", folder, *FAST], ["predict", folder, image]):
        result = _invoke(*argv, "--verify-key", keys["ed"][1])
        assert result.exit_code == 1, result.output
        assert expected in _one_error_line(result), argv


def test_another_key_fails_and_a_signed_artifact_says_it_is_not_verified(signed, keys, tmp_path):
    folder = _copy(signed, tmp_path)
    result = _invoke("validate", folder, *FAST, "--verify-key", keys["other"][1])
    assert result.exit_code == 1
    assert "is signed by another key" in _one_error_line(result)

    result = _invoke("validate", folder, *FAST)
    assert result.exit_code == 0, result.output
    assert "not verified: pass --verify-key" in result.stdout
    assert json.loads((folder / bundle.VALIDATION_FILE).read_text())["integrity"]["verified"] is False

    (folder / signing.SIGNATURE_FILE).unlink()  # without a key, a signed manifest still needs its signature
    result = _invoke("validate", folder, *FAST)
    assert result.exit_code == 1 and "missing file manifest.sig" in _one_error_line(result)


def test_an_unsigned_artifact_says_so_and_fails_with_a_verify_key(unsigned, keys, image, tmp_path):
    folder = _copy(unsigned, tmp_path)
    assert json.loads((folder / bundle.MANIFEST_FILE).read_text())["integrity"] == {"status": "checksummed, not signed"}
    assert not (folder / signing.SIGNATURE_FILE).exists()
    result = _invoke("validate", folder, *FAST)
    assert result.exit_code == 0, result.output
    assert "checksummed, not signed" in result.stdout
    report = json.loads((folder / bundle.VALIDATION_FILE).read_text())
    assert report["integrity"]["summary"] == "checksummed, not signed"
    for argv in (["validate", folder, *FAST], ["predict", folder, image]):
        result = _invoke(*argv, "--verify-key", keys["ed"][1])
        assert result.exit_code == 1
        assert 'is not signed (no manifest.sig; its manifest says "checksummed, not signed")' in _one_error_line(result)


def test_ecdsa_p256_signs_and_verifies(unsigned, keys, tmp_path):
    folder = _copy(unsigned, tmp_path)
    signer = signing.load_signer(keys["p256"][0])
    manifest = json.loads((folder / bundle.MANIFEST_FILE).read_text())
    bundle.write_manifest(folder, {**manifest, "integrity": signing.integrity(signer)})
    signing.sign_manifest(folder, signer)
    _, verdict = signing.verify_artifact(folder, keys["p256"][1])
    assert verdict["verified"] and verdict["algorithm"] == "ecdsa-p256-sha256"
    with pytest.raises(ArtifactError, match="signed by another key"):
        signing.verify_artifact(folder, keys["ed"][1])


@pytest.mark.parametrize(("key", "env", "expected"), [
    ("locked", None, "is encrypted; set $EDGETL_SIGN_PASSPHRASE to its passphrase"),
    ("locked", "wrong", "could not be read (wrong $EDGETL_SIGN_PASSPHRASE"),
    ("p384", None, "is not an Ed25519 or ECDSA P-256 key (ECDSA secp384r1)"),
    ("public", None, "is a public key; --sign-key takes the private key"),
])
def test_a_bad_signing_key_fails_before_any_work_without_printing_it(keys, tmp_path, monkeypatch, key, env,
                                                                     expected):
    path = keys["ed"][1] if key == "public" else keys[key][0]
    if env:
        monkeypatch.setenv(signing.PASSPHRASE_ENV, env)
    result = _invoke("export", "resnet18", *TINY, "--device", "x86", "--out", tmp_path / "art", "--sign-key", path)
    assert result.exit_code == 1
    line = _one_error_line(result)
    assert expected in line, line
    body = [row for row in path.read_text().splitlines() if row and not row.startswith("-----")]
    assert not any(row in result.output for row in body)  # no key material in the message
    assert not (tmp_path / "art").exists()


def test_an_encrypted_key_signs_with_its_passphrase(keys, monkeypatch):
    monkeypatch.setenv(signing.PASSPHRASE_ENV, "s3cret")
    signer = signing.load_signer(keys["locked"][0])
    assert signer.algorithm == "ed25519" and signer.fingerprint == signing.load_public_key(keys["locked"][1])[2]
    assert "PRIVATE" not in repr(signer) and signer.fingerprint in repr(signer)


def test_verify_key_needs_an_artifact_and_a_public_key(signed, keys, image):
    with pytest.raises(ConfigError, match="is a catalog name; drop --verify-key"):
        edgetl.predict("resnet18", [image], verify_key=keys["ed"][1])
    with pytest.raises(ConfigError, match="is a private key; pass the public key"):
        edgetl.validate(signed, verify_key=keys["ed"][0], write=False)



def test_build_files_take_the_keys_relative_to_their_folder_and_check_them_first(tmp_path):
    from edgetl.buildfile import config_from_dict
    from edgetl.pipeline import build

    config = config_from_dict({"device": "x86", "data": ".", "export": {"sign_key": "keys/signing.pem"},
                               "validate": {"verify_key": "keys/signing.pub"}}, base=tmp_path)
    assert config.export.sign_key == tmp_path / "keys" / "signing.pem"
    assert config.validate_.verify_key == tmp_path / "keys" / "signing.pub"
    (tmp_path / "data").mkdir()
    with pytest.raises(ConfigError, match=r"build config: export.sign_key: .*missing.pem does not exist"):
        build({"device": "x86", "data": str(tmp_path / "data"), "out": str(tmp_path / "out"),
               "export": {"sign_key": str(tmp_path / "missing.pem")}})
    assert not (tmp_path / "out").exists()



def test_a_new_key_at_the_same_path_reruns_the_build_export_and_keeps_no_secret(tmp_path):
    from edgetl.buildfile import config_from_dict
    from edgetl.pipeline import _Build

    (tmp_path / "data").mkdir()
    config = config_from_dict({"device": "x86", "data": "data", "export": {"sign_key": "signing.pem"}}, base=tmp_path)
    parts = []
    for _ in range(2):
        private, _public = _write_key(tmp_path, "signing", ed25519.Ed25519PrivateKey.generate())
        job = _Build(config, "pipeline.yaml", set(), None, False)
        parts.append(job._export_parts("finetune-digest"))
        secret = [row for row in private.read_text().splitlines() if row and not row.startswith("-----")]
        assert not any(row in json.dumps(parts[-1]) for row in secret)
    assert parts[0]["signing_key"] != parts[1]["signing_key"]  # the stage's inputs changed: export reruns
    assert job.artifact_dir / "manifest.sig" in job._export_outputs()
