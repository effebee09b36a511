"""``fwdllm bench``: every bench prints a table and writes <--out>/<bench>.json (+ .png), default results/."""

import click

from fwdllm.bench.attacks import attacks
from fwdllm.bench.comm import comm
from fwdllm.bench.convergence import convergence
from fwdllm.bench.fidelity import fidelity
from fwdllm.bench.field import field_link, field_memory, field_quota
from fwdllm.bench.load import load
from fwdllm.bench.memory import memory
from fwdllm.bench.noise import noise
from fwdllm.bench.probe import probe
from fwdllm.bench.quality import quality
from fwdllm.bench.round import round_cmd
from fwdllm.bench.secagg import secagg
from fwdllm.bench.throughput import throughput
from fwdllm.options import Group


@click.group("bench", cls=Group)
def bench() -> None:
    """Measure fwdllm: ratios are taken side by side in one run, because
    absolute times on shared machines are noisy.  Every bench writes its
    results under --out (default results/).

    \b
    Examples:
      fwdllm bench round --synth llama2-7b --quick
      fwdllm bench convergence --task sst2
      fwdllm bench quality --task sst2
      fwdllm bench memory --model smollm2-135m
      fwdllm bench comm --k 16
      fwdllm bench fidelity --k-max 256
      fwdllm bench load --sizes 10,100,1000
      fwdllm bench probe --task agnews
      fwdllm bench noise --task sst2
      fwdllm bench field-link --rtt 0.3 --loss 0.02 --rate 1
      fwdllm bench field-quota --mixes "1,0.5,0.25,0.25"
      fwdllm bench field-memory --synth llama2-7b --mem-limit 4.5
      fwdllm bench secagg --counts 4,16,100
      fwdllm bench attacks --baseline /path/to/older/.venv/bin/fwdllm
    """


for _cmd in (throughput, round_cmd, convergence, quality, memory, comm, fidelity, load, probe, noise,
             field_link, field_quota, field_memory, secagg, attacks):
    bench.add_command(_cmd)
