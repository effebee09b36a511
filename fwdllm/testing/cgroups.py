"""CPU and memory limits for child processes: a phone's core or its RAM on a server.

A :class:`Cgroup` is a fresh control group under this process's own one (so
whatever limits the sandbox already sets still apply), with a CPU quota in
cores (CFS bandwidth: ``cores`` x the period per period) and/or a memory limit
in bytes.  It uses cgroup v2 where the unified hierarchy has the ``cpu`` and
``memory`` controllers, else the v1 controllers (``cpu.cfs_quota_us``,
``memory.limit_in_bytes``).  Processes enter it through :meth:`Cgroup.wrap`,
which makes a command move itself into the group *before* it ``exec``s, so
nothing of it (its model load, its self-benchmark) runs unlimited.

Creating one needs root and writable cgroup mounts: :func:`unavailable` says
why not (tests skip with that reason).  Leaving the ``with`` kills whatever
is still inside (only processes this code put there) and removes the group.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")
PERIOD_US = 100_000  # CFS period: the kernel default; a quota is a share of it


def _own_paths() -> dict[str, str]:
    """Controller (v1) or ``""`` (v2) -> this process's cgroup path, from /proc/self/cgroup."""
    out: dict[str, str] = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for c in controllers.split(",") if controllers else [""]:
            out[c] = path
    return out


def _v2_root() -> Path | None:
    """The unified hierarchy, when it alone has both controllers."""
    for mount in (ROOT, ROOT / "unified"):
        ctl = mount / "cgroup.controllers"
        if ctl.exists() and {"cpu", "memory"} <= set(ctl.read_text().split()):
            return mount
    return None


def _parents() -> dict[str, Path]:
    """Where new groups go, per controller: under this process's own group."""
    own = _own_paths()
    v2 = _v2_root()
    if v2 is not None:
        base = v2 / own.get("", "/").lstrip("/")
        return {"cpu": base, "memory": base}
    return {c: ROOT / c / own.get(c, "/").lstrip("/") for c in ("cpu", "memory")}


def unavailable() -> str | None:
    """Why this machine cannot make limited groups here, or None if it can."""
    if os.geteuid() != 0:
        return "cgroups need root"
    try:
        parents = _parents()
    except OSError as e:
        return f"cannot read this process's cgroups: {e}"
    for controller, parent in parents.items():
        probe = parent / f"fwdllm-probe-{uuid.uuid4().hex[:8]}"
        try:
            probe.mkdir()
            probe.rmdir()
        except OSError as e:
            return f"cannot create a {controller} cgroup under {parent}: {e.strerror}"
    return None


class Cgroup:
    """One limited group (see the module docstring); use it as a context manager."""

    def __init__(self, name: str, cpu: float | None = None, mem_bytes: int | None = None) -> None:
        if cpu is not None and not cpu > 0:
            raise ValueError(f"cpu quota must be > 0 cores, got {cpu}")
        self.cpu, self.mem_bytes = cpu, mem_bytes
        self.v2 = _v2_root() is not None
        parents = _parents()
        leaf = f"fwdllm-{name}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        wanted = (["cpu"] if cpu is not None else []) + (["memory"] if mem_bytes is not None else [])
        self.paths = sorted({parents[c] / leaf for c in wanted or ["cpu"]})
        self._cpu = parents["cpu"] / leaf
        self._mem = parents["memory"] / leaf

    def __enter__(self) -> "Cgroup":
        for p in self.paths:
            p.mkdir()
        try:
            if self.cpu is not None:
                quota = max(1000, round(self.cpu * PERIOD_US))
                if self.v2:
                    (self._cpu / "cpu.max").write_text(f"{quota} {PERIOD_US}")
                else:
                    (self._cpu / "cpu.cfs_period_us").write_text(str(PERIOD_US))
                    (self._cpu / "cpu.cfs_quota_us").write_text(str(quota))
            if self.mem_bytes is not None:
                if self.v2:
                    (self._mem / "memory.max").write_text(str(self.mem_bytes))
                    (self._mem / "memory.swap.max").write_text("0")
                else:
                    (self._mem / "memory.limit_in_bytes").write_text(str(self.mem_bytes))
                    memsw = self._mem / "memory.memsw.limit_in_bytes"  # no swapping past the limit either
                    if memsw.exists():
                        memsw.write_text(str(self.mem_bytes))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for p in self.paths:
            if not p.exists():
                continue
            for _ in range(50):
                pids = [int(x) for x in (p / "cgroup.procs").read_text().split()]
                if not pids:
                    break
                for pid in pids:  # our own children, left behind by a failed run
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                time.sleep(0.1)
            p.rmdir()

    def wrap(self, cmd: list[str]) -> list[str]:
        """``cmd`` as a command that joins this group and then execs (limits hold from its first instruction)."""
        joins = " && ".join(f"echo $$ > {p / 'cgroup.procs'}" for p in self.paths)
        return ["/bin/sh", "-c", f'{joins} && exec "$@"', "cgroup-wrap", *cmd]

    # -- readings ------------------------------------------------------ #

    def _read(self, path: Path) -> dict[str, int]:
        out = {}
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            if value.strip().lstrip("-").isdigit():
                out[key] = int(value)
        return out

    def peak_bytes(self) -> int:
        """The group's peak memory charge (anonymous memory plus page cache it touched)."""
        name = "memory.peak" if self.v2 else "memory.max_usage_in_bytes"
        return int((self._mem / name).read_text())

    def oom_kills(self) -> int:
        """Processes of the group the kernel killed for memory."""
        return self._read(self._mem / ("memory.events" if self.v2 else "memory.oom_control")).get("oom_kill", 0)

    def throttled_s(self) -> float:
        """Seconds the group was held back by its CPU quota."""
        stat = self._read(self._cpu / "cpu.stat")
        return stat.get("throttled_usec", 0) / 1e6 if self.v2 else stat.get("throttled_time", 0) / 1e9
