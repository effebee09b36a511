"""``fwdllm bench attacks``: issue #31's attacks against live aggregators, before and after.

Each attack of :mod:`fwdllm.testing.attacks` starts its own ``aggregator
serve`` process on 127.0.0.1 and attacks it with model-free peers that speak
the wire protocol.  With ``--baseline`` every attack runs twice, against
another install's ``fwdllm`` (an older checkout: protocol v1 is the same)
and against this checkout, and each row shows both outcomes side by side.
The tests ``tests/test_attacks_*.py`` assert the same outcomes.
"""

from __future__ import annotations

import shlex
import tempfile
import time
from pathlib import Path
from typing import Any

import click

from fwdllm.bench.common import RESULTS, write_result
from fwdllm.options import Command, option


def _run(name: str, fwdllm: list[str], work: Path, model: Path) -> dict[str, Any]:
    from fwdllm.testing.attacks import run_attack

    t0 = time.monotonic()
    try:
        out = run_attack(name, fwdllm, work, model).to_dict()
    except Exception as e:  # an aggregator that dies or never starts is a result too
        out = {"held": False, "headline": f"error: {e}"[:200]}
    out["seconds"] = round(time.monotonic() - t0, 1)
    return out


@click.command("attacks", cls=Command)
@click.option("--baseline", default=None, metavar="COMMAND",
              help="Another fwdllm command to attack side by side, e.g. an older checkout's "
                   "'/path/.venv/bin/fwdllm' (default: this checkout only).")
@click.option("--only", multiple=True, metavar="NAME", help="Run only this attack (repeatable; default: all).")
@click.option("--gguf", "model", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="Base model file the aggregators load (default: the tiny synthetic model, written once).")
@option("out", default=RESULTS, help="Directory for attacks.json.")
def attacks(baseline: str | None, only: tuple[str, ...], model: Path | None, out: Path) -> None:
    """Attack live aggregators on 127.0.0.1 (issue #31) and print what held.

    Every attack starts an `aggregator serve` process and attacks it with
    model-free clients speaking the wire protocol: impostors and Sybils,
    snapshot floods, silent clients, overflowing numbers, a resume that forgets
    options, bad input. A few seconds to half a minute each.

    \b
    Examples:
      fwdllm bench attacks
      fwdllm bench attacks --baseline /opt/fwdllm-0.1/.venv/bin/fwdllm --only silent
    """
    from fwdllm.convert.synth import write_synth
    from fwdllm.core.errors import UserError
    from fwdllm.testing.attacks import ATTACKS, own_fwdllm

    unknown = sorted(set(only) - set(ATTACKS))
    if unknown:
        raise UserError(f"--only: unknown attack(s) {unknown}; known: {', '.join(ATTACKS)}")
    names = [n for n in ATTACKS if not only or n in only]
    targets = {"this checkout": own_fwdllm()}
    if baseline:
        targets = {"baseline": shlex.split(baseline), **targets}
    work = Path(tempfile.mkdtemp(prefix="fwdllm-attacks-"))
    model = model or write_synth(work / "tiny-q4_0.gguf", preset="tiny", quant="Q4_0", seed=0)
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        results[name] = {}
        for label, cmd in targets.items():
            r = _run(name, cmd, work / f"{name}-{label.replace(' ', '-')}", model)
            results[name][label] = r
            click.echo(f"{name} [{label}]: {'held' if r['held'] else 'BROKEN'} - {r['headline']} ({r['seconds']} s)",
                       err=True)
    headers = ["attack", "issue item", *[f"{t}" for t in targets], "held now"]
    rows = [[n, ATTACKS[n].item, *[results[n][t]["headline"] for t in targets], results[n]["this checkout"]["held"]]
            for n in names]
    write_result(out, "attacks", {"targets": {k: " ".join(v) for k, v in targets.items()}, "results": results,
                                  "model": str(model)},
                 {"Attacks on a live aggregator (127.0.0.1; docs/security.md)": (headers, rows)})
