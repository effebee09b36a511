"""``fwdllm bench``: every bench prints a table and writes RESULTS_DIR/<bench>.json (+ .png)."""

import click

from bench.comm import comm
from bench.convergence import convergence
from bench.fidelity import fidelity
from bench.load import load
from bench.memory import memory
from bench.noise import noise
from bench.probe import probe
from bench.round import round_cmd
from bench.throughput import throughput


@click.group("bench")
def bench() -> None:
    """Measure fwdllm: ratios are taken side by side in one run, because
    absolute times on shared machines are noisy.

    \b
    Examples:
      fwdllm bench round --synth llama2-7b --quick
      fwdllm bench convergence --task sst2
      fwdllm bench memory --model smollm2-135m
      fwdllm bench comm -k 16
      fwdllm bench fidelity --k-max 256
      fwdllm bench load --clients 10,100,1000
      fwdllm bench probe --task agnews
      fwdllm bench noise --task sst2
    """


for _cmd in (throughput, round_cmd, convergence, memory, comm, fidelity, load, probe, noise):
    bench.add_command(_cmd)
