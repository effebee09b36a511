"""Smoke test of ``fwdllm bench load``: a swarm of fake clients finishes its
rounds against the real aggregator, and the command writes its table.
(Timing goals are judged from the bench's output, not asserted here.)"""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from fwdllm.bench.load import load


def test_load_bench_smoke(tmp_path: Path) -> None:
    r = CliRunner().invoke(load, ["--sizes", "5,20", "--rounds", "3", "--out", str(tmp_path), "--timeout", "120"])
    assert r.exit_code == 0, r.output
    results = json.loads((tmp_path / "load.json").read_text())["results"]
    assert [x["clients"] for x in results] == [5, 20]
    for x in results:
        assert x["rounds"] == 3 and x["participants"] == x["clients"]
        assert 0 < x["server_cpu_ms"]["median"] <= x["round_wall_ms"]["median"]


def test_load_bench_rejects_bad_sizes(tmp_path: Path) -> None:
    r = CliRunner().invoke(load, ["--sizes", "ten", "--out", str(tmp_path)])
    assert r.exit_code != 0 and "comma-separated integers" in r.output
