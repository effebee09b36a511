"""Devices of uneven speed and phone-sized memory: rounds complete under CPU quotas (1, 0.25,
0.05 of a core), the adaptive split notices who is slow, a memory limit is really enforced, and a
`client run --no-mmap` device finishes its round inside one.

The limits are cgroups made here (:mod:`fwdllm.testing.cgroups`); the devices are real Workers in
their own processes (``python -m fwdllm.testing.fake``) doing CPU-bound fake work.  Skipped, with the
reason, on machines without root or writable cgroups (some CI runners).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from harness import TINY_BENCH, free_url, invoke, wait_until

from fwdllm.aggregator import checkpoint
from fwdllm.aggregator.server import ServerOptions
from fwdllm.aggregator.strategy import StrategySpec
from fwdllm.bench.field import field_memory
from fwdllm.core.optim import OptimizerSpec
from fwdllm.testing.cgroups import Cgroup, unavailable
from fwdllm.testing.fake import synthetic_run
from fwdllm.testing.harness import aggregator_thread

WHY = unavailable()
pytestmark = [pytest.mark.skipif(WHY is not None, reason=f"no cgroups here: {WHY}"), pytest.mark.timeout(60)]
MIB = 1 << 20


def run_limited(cg: Cgroup, code: str, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run(cg.wrap([sys.executable, "-c", code]), capture_output=True, text=True, timeout=timeout)


def test_cpu_quota_holds_a_busy_process_to_its_share() -> None:
    spin = "import time, resource\nt=time.perf_counter()\nwhile time.perf_counter()-t<1.5: pass\n" \
           "print(resource.getrusage(resource.RUSAGE_SELF).ru_utime, time.perf_counter()-t)"
    with Cgroup("test-cpu", cpu=0.25) as cg:
        out = run_limited(cg, spin)
        assert out.returncode == 0, out.stderr
        cpu_s, wall_s = map(float, out.stdout.split())
        assert cpu_s / wall_s < 0.35  # unlimited, it would be ~1
        assert cg.throttled_s() > 0


def test_memory_limit_kills_past_it_and_reports_the_peak() -> None:
    grab = "import sys\nb = bytearray(int(sys.argv[1]) << 20)\nb[::4096] = b'x' * len(b[::4096])\nprint('ok')"
    with Cgroup("test-mem", mem_bytes=96 * MIB) as cg:
        fits = subprocess.run(cg.wrap([sys.executable, "-c", grab, "32"]), capture_output=True, text=True, timeout=20)
        assert fits.returncode == 0 and fits.stdout.strip() == "ok", fits.stderr
        assert 32 * MIB < cg.peak_bytes() <= 96 * MIB
        over = subprocess.run(cg.wrap([sys.executable, "-c", grab, "256"]), capture_output=True, text=True, timeout=20)
        assert over.returncode == -9  # the kernel's OOM killer, not a Python MemoryError
        assert cg.oom_kills() >= 1


@pytest.mark.timeout(90)
def test_rounds_complete_under_cpu_quotas_and_adaptive_sees_the_slow_device(tmp_path: Path) -> None:
    # 0.05 of a core stays the slowest even when other jobs leave each process ~0.2 of a core (a shared
    # 2-core machine under load 10): a quota is a cap, not a guarantee
    quotas = {"fast": 1.0, "quarter": 0.25, "slow": 0.05}
    rounds, procs, groups, run_dir = 4, [], [], tmp_path / "run"
    cfg, replica = synthetic_run(rounds, OptimizerSpec(lr=0.05, total_rounds=rounds), StrategySpec("adaptive", k=12))
    checkpoint.write_config(run_dir, cfg)
    with aggregator_thread(run_dir, cfg, replica, ServerOptions(free_url(), min_clients=len(quotas))) as agg:
        try:
            for cid, cores in quotas.items():
                cg = Cgroup(f"test-{cid}", cpu=cores).__enter__()
                groups.append(cg)
                cmd = [sys.executable, "-m", "fwdllm.testing.fake", agg.opts.bind, cid, "20000"]
                with open(tmp_path / f"{cid}.log", "wb") as log:
                    procs.append(subprocess.Popen(cg.wrap(cmd), stdout=log, stderr=subprocess.STDOUT))
            wait_until(lambda: agg.replica.version >= rounds, 75, f"{rounds} rounds under CPU quotas")
            for p in procs:
                p.wait(15)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait(5)
            for cg in groups:
                cg.__exit__()
    recs = [r for r in checkpoint.read_metrics(run_dir) if r["round"] > 0]
    assert [r["round"] for r in recs] == list(range(1, rounds + 1))
    tp = recs[-1]["throughput"]  # the strategy's estimate, seeds/s, after every round's measurements
    assert tp["fast"] > 2 * tp["slow"], tp


@pytest.mark.timeout(120)
def test_a_no_mmap_device_completes_a_round_inside_a_memory_limit(tiny_model: Path, tmp_path: Path) -> None:
    """`bench field-memory`: a real `fwdllm client run --no-mmap` in a 512 MiB cgroup finishes its
    round, and its peak RSS (the model read into memory, not mapped) is reported inside the limit."""
    invoke(field_memory, ["--model", str(tiny_model), "--mem-limit", "0.5", "--k", "2", "--batch-size", "2",
                          "--shard-size", "8", "--timeout", "90", *TINY_BENCH, "--out", str(tmp_path)])
    data = json.loads((tmp_path / "field-memory.json").read_text())
    assert data["completed"], data["run"]
    rss = data["run"]["devices"]["dev0"]["peak_rss_bytes"]
    assert tiny_model.stat().st_size < rss < data["limit_bytes"]
