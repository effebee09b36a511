"""``fwdllm bench``: every bench prints a table and writes RESULTS_DIR/<bench>.json (+ .png)."""

import click

from bench.throughput import throughput


@click.group("bench")
def bench() -> None:
    """Measure fwdllm: ratios are taken side by side in one run, because
    absolute times on shared machines are noisy.
    """


bench.add_command(throughput)
