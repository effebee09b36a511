"""``fwdllm bench field-*``: the federation under field conditions, one command per condition.

* ``field-link``: every device behind its own slow, lossy link (:mod:`fwdllm.testing.relay`:
  RTT, TCP-style loss, rate, optional resets) against the same devices on a clean
  loopback link; rounds per hour of each, arms interleaved.
* ``field-quota``: devices of uneven speed (CPU quotas in cgroups, :mod:`fwdllm.testing.cgroups`);
  seconds per round of ``--strategy adaptive`` (seeds in proportion to measured
  throughput, the round ends at K) against ``zo-sgd`` (K split evenly), arms interleaved.
* ``field-memory``: one device in a phone-sized memory cgroup with the model loaded
  without mmap; did its round complete, and its peak RSS.

The devices are real processes (``fwdllm client run``, with ``--no-mmap`` for
``memory``); the aggregator is the real loop in a thread of this process, with
no dev-set evaluation, so round times are training alone.  Rounds per hour and
seconds per round come from ``metrics.jsonl``'s ``wall_s`` (round commit to round
commit, so they include the Update broadcast); round 1 (joins, snapshots) is
reported apart.  Everything runs on 127.0.0.1, bounded by ``--timeout``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click

from fwdllm.bench.common import GIB, RESULTS, bench_task, figure, number_list, save_figure, write_result
from fwdllm.options import Command, option, shared, threads_for


def _load() -> str:
    """``uptime``'s load averages: how shared the machine was while an arm ran."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _hwm(pid: int) -> int:
    """The peak RSS of ``pid``'s current image (VmHWM, bytes; 0 once it has exited).  Not
    ``ru_maxrss``: a child's starts at its parent's RSS when it forks (a test process with torch
    loaded makes that gigabytes)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _reap(proc: subprocess.Popen, timeout: float) -> Any:
    """Wait for ``proc`` (kill it after ``timeout``) and return its rusage: its CPU time."""
    end = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return usage
        if time.monotonic() > end:
            proc.kill()
            end = time.monotonic() + 10
        time.sleep(0.05)


def _dead(proc: subprocess.Popen) -> bool:
    """True once ``proc`` has exited (without reaping it: :func:`_reap` wants its rusage)."""
    try:
        return Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return True


def new_run(run_dir: Path, model: Path, sha: str, kw: dict[str, Any], strategy: str, rounds: int) -> tuple:
    """A fresh run of ``model`` with the shared training defaults, no dev set."""
    from fwdllm.aggregator import setup
    from fwdllm.aggregator.strategy import StrategySpec
    from fwdllm.core.optim import OptimizerSpec
    from fwdllm.options import parse_targets

    lora = setup.LoraSpec(kw["rank"], 2.0 * kw["rank"], parse_targets(kw["targets"]), kw["seed"])
    spec = StrategySpec(strategy, run_seed=kw["seed"], k=kw["k"], batch_size=kw["batch_size"])
    return setup.new_run(run_dir, model, sha, kw["task"], None, None, rounds, rounds, lora,
                         OptimizerSpec(lr=0.1, total_rounds=rounds), spec)


def federate(work: Path, name: str, model: Path, sha: str, kw: dict[str, Any], *, strategy: str = "zo-sgd",
             links: list[Any] | None = None, cpus: list[float | None] | None = None, mem_bytes: int | None = None,
             device_flags: tuple[str, ...] = ()) -> dict[str, Any]:
    """One run of ``kw["rounds"]`` rounds with ``len(shards)`` devices, each maybe behind
    ``links[i]`` and inside a cgroup of ``cpus[i]`` cores / ``mem_bytes``; its measurements."""
    from tqdm import tqdm

    from fwdllm.aggregator import checkpoint
    from fwdllm.aggregator.server import ServerOptions
    from fwdllm.aggregator.simulate import free_port
    from fwdllm.testing.cgroups import Cgroup
    from fwdllm.testing.harness import aggregator_thread, port_of
    from fwdllm.testing.relay import Relay

    shards: list[Path] = kw["shards"]
    n, rounds = len(shards), kw["rounds"]
    run_dir = work / name
    if kw.get("model_free"):  # devices that compute nothing: what is left of a round is the link's
        from fwdllm.aggregator.strategy import StrategySpec
        from fwdllm.core.optim import OptimizerSpec
        from fwdllm.testing.fake import synthetic_run

        cfg, replica = synthetic_run(rounds, OptimizerSpec(lr=0.05, total_rounds=rounds), StrategySpec(strategy, k=kw["k"]))
        run_dir.mkdir(parents=True)
        checkpoint.write_config(run_dir, cfg)
    else:
        cfg, replica = new_run(run_dir, model, sha, kw, strategy, rounds)
    opts = ServerOptions(bind=f"tcp://127.0.0.1:{free_port()}", heartbeat_s=kw.get("heartbeat_s", 1.0), min_clients=n,
                         round_timeout_s=kw["timeout_s"])
    procs: list[subprocess.Popen] = []
    usage: dict[str, Any] = {}
    t0 = time.monotonic()
    with contextlib.ExitStack() as stack:
        agg = stack.enter_context(aggregator_thread(run_dir, cfg, replica, opts))
        groups, relays = [], []
        for i, shard in enumerate(shards):
            url = opts.bind
            if links and links[i] is not None:
                relays.append(stack.enter_context(Relay(("127.0.0.1", port_of(agg)), links[i])))
                url = relays[-1].url
            cid = f"dev{i}"
            cmd = [sys.executable, "-m", "fwdllm.edge_client", "run", *device_flags, "--connect", url,
                   "--model", str(model), "--data", str(shard), "--task", kw["task"], "--threads", str(kw["threads"]),
                   "--client-id", cid, "--max-batch", str(kw["batch_size"]), "--events", str(run_dir / f"{cid}.jsonl"),
                   "--give-up", "60"]
            if kw.get("model_free"):
                cmd = [sys.executable, "-m", "fwdllm.testing.fake", url, cid, "0"]
            cpu = cpus[i] if cpus else None
            if cpu is not None or mem_bytes is not None:
                groups.append(stack.enter_context(Cgroup(f"field-{cid}", cpu=cpu, mem_bytes=mem_bytes)))
                cmd = groups[-1].wrap(cmd)
            with open(run_dir / f"{cid}.log", "wb") as log:
                procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
        stack.callback(lambda: [p.kill() for p in procs if p.returncode is None])
        hwm = [0] * len(procs)
        with tqdm(total=rounds, desc=name, unit="round", file=sys.stderr, leave=False) as bar:
            while agg.replica.version < rounds and time.monotonic() - t0 < kw["timeout_s"]:
                if all(_dead(p) for p in procs):
                    break
                hwm = [max(h, _hwm(p.pid)) for h, p in zip(hwm, procs)]
                bar.update(agg.replica.version - bar.n)
                time.sleep(0.2)
        done = agg.replica.version
        if done < rounds:  # timed out, or every device died: end the run, the devices' give-up ends them
            agg.stop.set()
        for i, p in enumerate(procs):
            hwm[i] = max(hwm[i], _hwm(p.pid))
            usage[f"dev{i}"] = _reap(p, 30)
        peaks = [(g.peak_bytes(), g.oom_kills()) for g in groups] if mem_bytes is not None else []
        link_stats = [vars(r.stats()) for r in relays]
    recs = [r for r in checkpoint.read_metrics(run_dir) if r["round"] > 0]
    walls = [r["wall_s"] for r in recs]
    steady = [b - a for a, b in zip(walls, walls[1:])]  # round 2 on: commit to commit
    out = {
        "arm": name, "strategy": strategy, "rounds_done": done, "rounds": rounds, "load": _load(),
        "first_round_s": walls[0] if walls else None,
        "round_s": steady,
        "s_per_round": statistics.median(steady) if steady else None,
        "rounds_per_hour": 3600 * len(steady) / (walls[-1] - walls[0]) if len(steady) else None,
        "perturbations": [r["perturbations"] for r in recs],
        "throughput": [r.get("throughput") for r in recs],
        "devices": {cid: {"rc": p.returncode, "peak_rss_bytes": hwm[i],
                          "cpu_s": u.ru_utime + u.ru_stime, "cores": cpus[i] if cpus else None,
                          # a device that failed says why here: the run directory goes with the workspace
                          "log_tail": None if p.returncode == 0 else
                          (run_dir / f"{cid}.log").read_text(errors="replace")[-2000:]}
                    for i, ((cid, u), p) in enumerate(zip(usage.items(), procs))},
        "links": link_stats,
    }
    if peaks:
        out["cgroup_peak_bytes"], out["oom_kills"] = peaks[0]
    wall = time.monotonic() - t0
    for d in out["devices"].values():
        d["cores_used"] = d["cpu_s"] / wall
    return out


@contextlib.contextmanager
def workspace(kw: dict[str, Any], n_devices: int) -> Any:
    """A scratch directory with one data shard per device (removed afterwards)."""
    from fwdllm.aggregator.simulate import write_shards

    work = Path(tempfile.mkdtemp(prefix="fwdllm-field-"))
    try:
        kw["shards"] = write_shards(kw["task"], work / "shards", n_devices, kw["shard_size"], None, kw["seed"])
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _model(model: str) -> tuple[Path, str]:
    from fwdllm.runtime.models import model_sha256, resolve_model

    path = resolve_model(model)
    return path, model_sha256(path)


def run_options(f: Any) -> Any:
    """What every field bench takes: the training job and its bounds."""
    f = option("out", default=RESULTS, help="Directory for field-*.json and field-*.png.")(f)
    f = click.option("--timeout", "timeout_s", type=click.FloatRange(min=0, min_open=True), default=300.0, show_default=True,
                     help="Give up on an arm after this many seconds.")(f)
    f = click.option("--shard-size", type=click.IntRange(1), default=200, show_default=True,
                     help="Training examples per device.")(f)
    f = shared("task", "k", "batch_size", "rank", "targets", "seed", "threads")(f)
    return f


def _require_cgroups() -> None:
    from fwdllm.core.errors import UserError
    from fwdllm.testing.cgroups import unavailable

    why = unavailable()
    if why:
        raise UserError(f"this bench needs cgroups: {why}")


@click.command("field-link", cls=Command)
@option("model")
@option("clients", default=2, help="Devices, each behind its own link.")
@option("rounds", default=8, help="Rounds per arm (round 1, joins and snapshots, is reported apart).")
@click.option("--runs", "repeats", type=click.IntRange(1), default=2, show_default=True, help="Runs of each arm, interleaved.")
@click.option("--rtt", type=click.FloatRange(min=0), default=0.3, show_default=True, help="Round-trip time, seconds.")
@click.option("--loss", type=click.FloatRange(0, 1, max_open=True), default=0.02, show_default=True,
              help="Probability that a TCP segment is lost (it arrives one retransmission timeout later).")
@click.option("--rate", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="Link rate per direction, Mbit/s (0: unlimited).")
@click.option("--resets", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Mean seconds between connection resets (0: none).")
@click.option("--heartbeat", "heartbeat_s", type=click.FloatRange(min=0.05), default=1.0, show_default=True,
              help="Heartbeat interval, seconds.")
@click.option("--model-free", is_flag=True,
              help="Devices that compute nothing (the quadratic fake): a round's time is then the link's alone.")
@run_options
def field_link(model: str, clients: int, rounds: int, repeats: int, rtt: float, loss: float, rate: float, resets: float,
               heartbeat_s: float, model_free: bool, out: Path, **kw: Any) -> None:
    """Rounds per hour with every device behind a slow, lossy link vs a clean one.

    A device drops the aggregator after 5 heartbeats without a whole message,
    so a snapshot that needs longer than that on the link never arrives: raise
    --heartbeat for big adapters on slow links.

    \b
    Example:
      fwdllm bench field-link --rtt 0.3 --loss 0.02 --rate 1 --clients 2 --rounds 8
    """
    from fwdllm.testing.relay import LinkSpec

    kw.update(rounds=rounds, threads=threads_for(kw["threads"], clients + 1), heartbeat_s=heartbeat_s,
              model_free=model_free)
    path, sha = _model(model)
    runs = []
    with workspace(kw, clients) as work:
        for rep in range(repeats):
            for arm in ("clean", "field"):
                links = None if arm == "clean" else [
                    LinkSpec(rtt_s=rtt, loss=loss, rate_bps=rate * 1e6, reset_every_s=resets, seed=rep * clients + i)
                    for i in range(clients)]
                runs.append({**federate(work, f"{arm}-{rep}", path, sha, kw, links=links), "repeat": rep})
                click.echo(f"{arm} #{rep}: {runs[-1]['rounds_per_hour']} rounds/h (load {runs[-1]['load']})", err=True)
    summary = {arm: [r["rounds_per_hour"] for r in runs if r["arm"].startswith(arm)] for arm in ("clean", "field")}
    rows = [[r["arm"], r["rounds_done"], r["first_round_s"], r["s_per_round"], r["rounds_per_hour"], r["load"],
             sum(lk["resets"] for lk in r["links"]), sum(lk["up"]["lost"] + lk["down"]["lost"] for lk in r["links"])]
            for r in runs]
    spec = {"rtt_s": rtt, "loss": loss, "rate_mbit_s": rate, "reset_every_s": resets}
    name = "field-link-model-free" if model_free else "field-link"
    write_result(out, name, {"model": "none (quadratic fake)" if model_free else str(path), "link": spec,
                             "clients": clients, "runs": runs, "heartbeat_s": heartbeat_s,
                             "rounds_per_hour": summary, "k": kw["k"], "batch_size": kw["batch_size"]},
                 {f"Rounds/hour, {clients} devices, clean loopback vs {rtt * 1e3:.0f} ms RTT, {loss:.0%} loss, "
                  f"{rate:g} Mbit/s": (["arm", "rounds", "round 1 s", "s/round", "rounds/h", "load (1/5/15 min)",
                                         "resets", "segments lost"], rows)})
    fig, (ax,) = figure(1)
    for i, arm in enumerate(("clean", "field")):
        vals = [v for v in summary[arm] if v]
        ax.bar(i, statistics.median(vals) if vals else 0, color="C0" if arm == "clean" else "C3")
        ax.plot([i] * len(vals), vals, "ko", ms=4)
    ax.set_xticks([0, 1], ["clean loopback", f"{rtt * 1e3:.0f} ms, {loss:.0%} loss, {rate:g} Mbit/s"])
    ax.set_ylabel("rounds per hour")
    save_figure(fig, out, name)


@click.command("field-quota", cls=Command)
@option("model")
@click.option("--mixes", default="1,0.5,0.25,0.25;0.5,0.5,0.5,0.5", show_default=True, metavar="C,C,..;...",
              help="CPU quotas in cores, one per device; mixes separated by ';'.")
@click.option("--compare", "strategies", default="zo-sgd,adaptive", show_default=True,
              help="Strategies to compare, comma-separated.")
@option("rounds", default=8, help="Rounds per run (round 1, joins and snapshots, is reported apart).")
@click.option("--runs", "repeats", type=click.IntRange(1), default=2, show_default=True, help="Runs of each arm, interleaved.")
@run_options
def field_quota(model: str, mixes: str, strategies: str, rounds: int, repeats: int, out: Path, **kw: Any) -> None:
    """Seconds per round to K perturbations: adaptive split vs a fixed one, devices under CPU quotas.

    \b
    Example:
      fwdllm bench field-quota --mixes "1,0.5,0.25,0.25" --rounds 8 --runs 2
    """
    from fwdllm.aggregator.registry import STRATEGIES
    from fwdllm.core.errors import UserError

    _require_cgroups()
    parse = number_list(float, 0.01, 64.0, positive=True)
    mix_list = [parse(None, None, m) for m in mixes.split(";") if m.strip()]
    names = [s for s in strategies.split(",") if s]
    if not mix_list or len({len(m) for m in mix_list}) != 1:
        raise UserError("--mixes: every mix needs one quota per device, the same number of devices in each")
    if not names or any(s not in STRATEGIES for s in names):
        raise UserError(f"--compare: choose from {', '.join(STRATEGIES)}")
    n = len(mix_list[0])
    kw.update(rounds=rounds, threads=kw["threads"] or 1)
    path, sha = _model(model)
    runs = []
    with workspace(kw, n) as work:
        for rep in range(repeats):
            for m, mix in enumerate(mix_list):
                for s in names:
                    r = federate(work, f"m{m}-{s}-{rep}", path, sha, kw, strategy=s, cpus=mix)
                    runs.append({**r, "mix": mix, "repeat": rep})
                    click.echo(f"mix {mix} {s} #{rep}: {r['s_per_round']} s/round (load {r['load']})", err=True)
    table = []
    for mix in mix_list:
        for s in names:
            arm = [r for r in runs if r["mix"] == mix and r["strategy"] == s]
            spr = [r["s_per_round"] for r in arm if r["s_per_round"]]
            table.append([",".join(f"{c:g}" for c in mix), s, len(arm), statistics.median(spr) if spr else None,
                          " / ".join(f"{x:.1f}" for x in spr), statistics.median(p for r in arm for p in r["perturbations"]),
                          " / ".join(r["load"].split()[0] for r in arm)])
    write_result(out, "field-quota", {"model": str(path), "runs": runs, "k": kw["k"], "batch_size": kw["batch_size"],
                                      "threads": kw["threads"]},
                 {f"Seconds per round to K={kw['k']} perturbations, {n} devices under CPU quotas (cores)": (
                     ["quotas", "strategy", "runs", "s/round (median)", "per run", "perturbations", "load (1 min)"],
                     table)})
    fig, (ax,) = figure(1)
    for i, row in enumerate(table):
        ax.bar(i, row[3] or 0, color=f"C{names.index(row[1])}", label=row[1] if i < len(names) else None)
    ax.set_xticks(range(len(table)), [f"{r[0]}\n{r[1]}" for r in table], fontsize=7)
    ax.set_ylabel("seconds per round (median)")
    ax.legend(fontsize=8)
    save_figure(fig, out, "field-quota")


@click.command("field-memory", cls=Command)
@option("model")
@click.option("--synth", default=None, metavar="PRESET",
              help="Use this synthetic preset (e.g. llama2-7b, written on first use and cached) instead of --model.")
@click.option("--mem-limit", "limit_gib", type=click.FloatRange(min=0.1), default=4.5, show_default=True,
              help="Memory limit of the device's cgroup, GiB.")
@option("rounds", default=1, help="Rounds the device must complete inside the limit.")
@shared("label_words")
@run_options
def field_memory(model: str, synth: str | None, limit_gib: float, rounds: int, label_words: str | None, out: Path,
                 **kw: Any) -> None:
    """One device, model loaded without mmap, inside a memory cgroup: does its round complete, at what peak RSS.

    \b
    Example:
      fwdllm bench field-memory --synth llama2-7b --mem-limit 4.5 --k 1 --batch-size 2 \\
          --label-words negative,positive
    """
    from fwdllm.bench.round import synth_model

    _require_cgroups()
    kw.update(rounds=rounds, threads=threads_for(kw["threads"]))
    path, sha = _model(str(synth_model(synth)) if synth else model)
    limit = int(limit_gib * GIB)
    with workspace(kw, 1) as work:
        if label_words:  # the run and the device read the task from one spec file
            spec = bench_task(kw["task"], label_words, kinds=None)
            (work / "task.json").write_text(json.dumps(spec.to_dict()))
            kw["task"] = str(work / "task.json")
        r = federate(work, "memory", path, sha, kw, mem_bytes=limit, device_flags=("--no-mmap",))
    rss = r["devices"]["dev0"]["peak_rss_bytes"]
    ok = r["rounds_done"] >= rounds and r["oom_kills"] == 0
    size = path.stat().st_size
    rows = [[path.name, size / GIB, limit_gib, "yes" if ok else "NO", r["rounds_done"], rss / GIB,
             r["cgroup_peak_bytes"] / GIB, r["oom_kills"], r["first_round_s"]]]
    write_result(out, "field-memory", {"model": str(path), "size_bytes": size, "limit_bytes": limit, "run": r,
                                       "k": kw["k"], "batch_size": kw["batch_size"], "completed": ok},
                 {"One device in a memory cgroup, model loaded without mmap": (
                     ["model", "file GiB", "limit GiB", "round completed", "rounds", "peak RSS GiB",
                      "cgroup peak GiB (incl. page cache)", "OOM kills", "round 1 s (load, join, round)"], rows)})
    fig, (ax,) = figure(1)
    ax.bar(["file", "peak RSS", "cgroup peak"], [size / GIB, rss / GIB, r["cgroup_peak_bytes"] / GIB])
    ax.axhline(limit_gib, color="r", ls="--", label=f"limit {limit_gib:g} GiB")
    ax.set_ylabel("GiB")
    ax.legend(fontsize=8)
    save_figure(fig, out, "field-memory")
