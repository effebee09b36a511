"""What every bench shares: results files, tables, plots, peak memory, provenance.

A bench result is one JSON object (``<--out>/<bench>.json``, default ``results/``) that names the
commit and machine it came from, because numbers without provenance cannot be
compared later; the table printed on stdout is the same data for humans.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import click

REPO = Path(__file__).resolve().parents[1]
GIB = 1024**3


#: Where every bench writes ``<bench>.json`` and ``<bench>.png`` by default (``--out``).
RESULTS = Path("results")


def out_help(name: str) -> str:
    """``--out``'s help for bench ``name``."""
    return f"Directory for {name}.json and {name}.png."


def number_list(kind: type, low: float = -float("inf"), high: float = float("inf"), *,
                positive: bool = False) -> Callable:
    """click callback for a comma-separated list of numbers in [low, high) (and > 0 with ``positive``): a
    typo or a value out of range is click's one-line usage error before a bench spends minutes on features
    or runs, not a traceback after."""
    def parse(ctx: click.Context, param: click.Parameter, value: str) -> list:
        try:
            out = [kind(x) for x in value.split(",") if x.strip()]
        except ValueError:
            noun = "integers" if kind is int else f"{kind.__name__}s"
            raise click.BadParameter(f"expected comma-separated {noun}, got {value!r}") from None
        if not out or not all(low <= x < high and (x > 0 or not positive) for x in out):
            bounds = "positive" if positive else f"in [{low:g}, {high:g})"
            raise click.BadParameter(f"values must be {bounds}, got {value!r}")
        return out
    return parse


def bench_task(task: str, label_words: str | None, template: str | None = None, *,
               kinds: Sequence[str] | None = ("classify",)):  # noqa: ANN201 - TaskSpec
    """The ``--task`` preset or spec file with ``--label-words`` (and a prompt
    ``template``) applied; a task whose kind is not in ``kinds`` (None: any) is a
    one-line error, because most benches read the label words' logits."""
    from fwdllm.core.errors import UserError
    from fwdllm.options import parse_label_words
    from fwdllm.runtime.tasks import load_task

    spec = load_task(task, label_words=parse_label_words(label_words), template=template)
    if kinds is not None and spec.kind not in kinds:
        raise UserError(f"--task {task}: this bench needs a {' or '.join(kinds)} task, not {spec.kind}")
    return spec


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM): counts mmapped file pages
    that were touched as well as anonymous memory, which is what a phone's
    memory budget sees."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM not in /proc/self/status")  # pragma: no cover - Linux only


def current_rss_bytes() -> int:
    """This process's resident set now (VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("VmRSS not in /proc/self/status")  # pragma: no cover - Linux only


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:  # pragma: no cover
        pass
    return platform.processor() or platform.machine()


def provenance() -> dict[str, Any]:
    """Commit (``+dirty`` when the bench files differ from it) and machine."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "commit": commit,
        "machine": f"{cores}-core CPU, {cpu_name()}",
        "gpu": "none",
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-markdown table (pastes into bench/README.md as is)."""

    def cell(v: Any) -> str:
        if v is None:  # not measured / not reached
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    body = [[cell(v) for v in r] for r in rows]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


def write_result(out: Path, name: str, data: dict[str, Any], tables: dict[str, tuple[list, list]]) -> Path:
    """Print every table, then write ``<name>.json`` with provenance and tables."""
    out.mkdir(parents=True, exist_ok=True)
    prov = provenance()
    click.echo(f"# {name}  (commit {prov['commit']}, {prov['machine']})")
    for title, (headers, rows) in tables.items():
        click.echo(f"\n{title}\n{format_table(headers, rows)}")
    path = out / f"{name}.json"
    payload = {"bench": name, **prov, **data, "tables": {t: {"headers": h, "rows": r} for t, (h, r) in tables.items()}}
    path.write_text(json.dumps(payload, indent=1, default=float))
    click.echo(f"\nwrote {path} and {out / (name + '.png')}")
    return path


def figure(n_panels: int = 1):  # noqa: ANN201 - matplotlib types
    """A matplotlib figure on the Agg backend (benches run headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, n_panels, figsize=(5.5 * n_panels, 4), squeeze=False)
    return fig, list(axes[0])


def save_figure(fig, out: Path, name: str) -> Path:  # noqa: ANN001
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_child(module: str, args: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
    """Run ``python -m <module>`` with ``args`` as JSON on stdin; return the
    JSON object it prints last.  Used where peaks of memory must not mix."""
    proc = subprocess.run(
        [sys.executable, "-m", module],
        input=json.dumps(args),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout)[-2000:]
        raise click.ClickException(f"{module} failed (rc {proc.returncode}):\n{tail}")
    return json.loads(lines[-1])


def child_main(fn: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """Entry point of a ``run_child`` worker: JSON args in, JSON (+ peak RSS) out."""
    args = json.loads(sys.stdin.read())
    result = fn(args)
    result["peak_rss_bytes"] = peak_rss_bytes()
    print(json.dumps(result, default=float), flush=True)
