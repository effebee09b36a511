"""``fwdllm bench comm``: bytes per client per round, up and down.

fwdllm's numbers are the encoded sizes of the real messages
(:meth:`fwdllm.core.protocol.Message.to_frames`, summed frame lengths; ZeroMQ adds
a few bytes of framing per frame): a ``Task`` and the round's ``Update`` go
down, a ``Result`` goes up.  The baselines move tensors, so their bytes are
the float32 payload of what they must ship:

* FedAvg-LoRA (FwdLLM's code base, backprop): every participant downloads the
  global LoRA and uploads its trained LoRA.
* FedCyBGD (arXiv 2406.11187) with LoRA: the trainable layers are split into
  one block per client; the round's client downloads the blocks updated since
  its last turn (all others: ``(N-1)/N`` of the adapter once every client has
  had a turn) and uploads only its own block.
"""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from fwdllm.bench.common import RESULTS, figure, out_help, save_figure, write_result
from fwdllm.options import Command, option, parse_targets, shared


def message_bytes(msg) -> int:  # noqa: ANN001 - fwdllm.core.protocol.Message
    return sum(len(f) for f in msg.to_frames())


def fwdllm_bytes(n_seeds: int, k_total: int, batch_size: int = 8, head_shape: tuple[int, int] | None = None,
                 head_codec: str = "int8") -> dict[str, int]:
    """Encoded Task + Update (down) and Result (up) of one client scoring
    ``n_seeds`` of a ``k_total``-seed central-difference round; with
    ``--head``, Result and Update also carry a ``head_shape`` gradient in
    ``head_codec`` (the default, int8)."""
    from fwdllm.core import compress
    from fwdllm.core.layout import PerturbMask
    from fwdllm.core.protocol import Result, Task, Update

    rng = np.random.default_rng(0)
    sha = "ab" * 32
    mask = PerturbMask(parts="b").to_dict()
    seeds = rng.integers(0, 2**32, n_seeds, dtype=np.uint32)
    task = Task(round=1234, version=1234, adapter_sha256=sha, seeds=seeds, mask=mask, eps=1e-2,
                batch_size=batch_size, batch_seed=int(rng.integers(0, 2**32)))
    losses = rng.uniform(0.1, 2.0, (2, n_seeds))
    head = compress.encode(rng.normal(size=head_shape), head_codec)[0] if head_shape else b""
    codec = head_codec if head_shape else "f32"
    result = Result(round=1234, seeds=seeds, loss_plus=losses[0], loss_minus=losses[1], n_tokens=4321, seconds=12.5,
                    head_grad=head, head_rows=batch_size if head_shape else 0, head_codec=codec)
    update = Update(round=1234, version=1235, lr=1e-3, adapter_sha256=sha,
                    seeds=rng.integers(0, 2**32, k_total, dtype=np.uint32), coeffs=rng.normal(size=k_total), mask=mask,
                    head_grad=head, head_codec=codec)
    return {"task": message_bytes(task), "update": message_bytes(update), "result": message_bytes(result)}


def lora_layout(model: str, rank: int, targets: tuple[str, ...]):  # noqa: ANN201 - LoraLayout
    from fwdllm.core.lora import layout_for_base
    from fwdllm.runtime.models import resolve_model

    return layout_for_base(resolve_model(model), rank, 2.0 * rank, targets)


@click.command("comm", cls=Command)
@option("model")
@shared("rank", "targets", "k")
@option("clients", help="Clients per round (= FedCyBGD blocks).")
@click.option("--head-labels", type=click.IntRange(0), default=4, show_default=True,
              help="Also price --head with this many label words (0 = leave the row out).")
@option("out", default=RESULTS, help=out_help("comm"))
def comm(model: str, rank: int, targets: str, k: int, clients: int, head_labels: int, out: Path) -> None:
    """Bytes per client per round: fwdllm's seeds and scalars vs dense LoRA vs block upload.

    The LoRA's shapes (rank --rank on --targets) come from --model.

    \b
    Example:
      fwdllm bench comm --model smollm2-135m --k 16 --clients 4
    """
    from fwdllm.core.errors import UserError

    if k < 1:
        raise UserError("--k must be >= 1")
    lora_targets = parse_targets(targets)
    layout = lora_layout(model, rank, lora_targets)
    on = ",".join(lora_targets)
    lora = layout.n_params * 4
    n_layers = len(layout.layers)
    blocks = min(clients, n_layers)
    block = lora * (n_layers // blocks) // n_layers  # one block of layers' LoRA (the smallest block)
    per_client = -(-k // clients)
    solo, shared = fwdllm_bytes(k, k), fwdllm_bytes(per_client, k)
    rows = [
        [f"fwdllm, 1 client x {k} seeds", solo["task"] + solo["update"], solo["result"]],
        [f"fwdllm, {clients} clients x {per_client} seeds", shared["task"] + shared["update"], shared["result"]],
        ["FedAvg-LoRA (dense f32)", lora, lora],
        [f"FedCyBGD-LoRA ({blocks} blocks)", lora - block, block],
    ]
    if head_labels:
        from fwdllm.core.gguf_file import read_header
        from fwdllm.runtime.models import resolve_model

        n_embd = int(read_header(resolve_model(model)).field("llama.embedding_length"))
        headed = fwdllm_bytes(per_client, k, head_shape=(head_labels, n_embd))
        rows.append([f"fwdllm --head ({head_labels} labels, int8), {clients} clients x {per_client} seeds",
                     headed["task"] + headed["update"], headed["result"]])
    table = [[name, down, up, up / rows[0][2], down / rows[0][1]] for name, down, up in rows]
    write_result(
        out,
        "comm",
        {"model": model, "rank": rank, "targets": on, "k": k, "clients": clients,
         "lora_params": layout.n_params,
         "fwdllm_messages": {"solo": solo, "shared": shared}},
        {
            f"Bytes per client per round ({model}, LoRA r={rank} on {on}: {layout.n_params} params, K={k})": (
                ["scheme", "down B", "up B", "up / fwdllm", "down / fwdllm"],
                table,
            ),
            "fwdllm messages (bytes)": (
                ["client share", "Task", "Update", "Result"],
                [[f"{k} seeds", solo["task"], solo["update"], solo["result"]],
                 [f"{per_client} seeds", shared["task"], shared["update"], shared["result"]]],
            ),
        },
    )
    fig, (ax,) = figure(1)
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [r[1] for r in rows], 0.4, label="down")
    ax.bar(x + 0.2, [r[2] for r in rows], 0.4, label="up")
    ax.axhline(1024, color="r", ls=":", label="1 KiB goal")
    ax.set_yscale("log")
    ax.set_xticks(x, [r[0] for r in rows], rotation=15, fontsize=7)
    ax.set_ylabel("bytes per client per round")
    ax.legend()
    save_figure(fig, out, "comm")
