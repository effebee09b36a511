"""Protocol v2: the update history, replay vs snapshot, compressed head gradients.

A device that is behind rebuilds the server's adapter from the init seed and
the replayed updates; these tests pin that the replay lands on the same hash
as the replica that stepped live, that the compact binary form round-trips,
that the cost model picks the cheaper path, and that head codecs decode to
the same bits everywhere with error feedback carrying what rounding lost.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fwdllm.core import compress
from fwdllm.core.directions import direction
from fwdllm.core.history import History, catch_up_plan, replay_entries
from fwdllm.core.layout import LoraLayout, PerturbMask
from fwdllm.core.lora import initial_tensors
from fwdllm.core.optim import Optimizer, OptimizerSpec
from fwdllm.core.protocol import Message, Replay, Update
from fwdllm.core.replica import Replica

SPEC = OptimizerSpec(name="adam", lr=1e-3, ema=0.9)


def _layout(head: bool = True) -> LoraLayout:
    shapes = {f"blk.{i}.attn_v.weight": (32, 64) for i in range(3)}
    lay = LoraLayout.for_base(shapes, 4, 8, ["v"])
    return dataclasses.replace(lay, head=(2, 64), head_ids=(3, 7), n_vocab=100) if head else lay


def _run(rounds: int, codec: str = "int8") -> tuple[Replica, History]:
    """A replica stepped live for ``rounds`` rounds, and its history."""
    lay = _layout()
    live = Replica(lay, initial_tensors(lay, 7), Optimizer(SPEC), 0)
    hist = History(0, live.sha)
    rng = np.random.default_rng(0)
    residual = None
    for r in range(1, rounds + 1):
        mask = {"parts": "b", "layers": [r % 3, r % 3 + 1], "targets": None}  # block-cyclic masks
        raw, residual = compress.encode(rng.normal(size=(2, 64)), codec, residual)
        up = Update(round=r, version=r, lr=SPEC.lr_at(r - 1), adapter_sha256="",
                    seeds=rng.integers(0, 2**32, 5, dtype=np.uint32), coeffs=rng.normal(size=5),
                    mask=mask, dist="rademacher" if r % 2 else "gaussian", head_grad=raw, head_codec=codec)
        live.apply(up)
        hist.append(Update(**{**up.__dict__, "adapter_sha256": live.sha}))
    return live, hist


@pytest.mark.parametrize("start", [0, 4, 9])
def test_replay_from_any_version_lands_on_the_live_hash(start):
    live, hist = _run(10)
    lay = live.layout
    late = Replica(lay, initial_tensors(lay, 7), Optimizer(SPEC), 0)
    assert late.replay(hist.since(0)[:start], hist.sha_at(start))  # a device that stopped at `start`
    wire = Message.from_frames(Replay(version=hist.version, adapter_sha256=hist.sha_at(10),
                                      history=hist.encode(start, all_shas=False)).to_frames())
    got = History.decode(wire.history)
    assert got.base_version == start and len(got.updates) == 10 - start
    assert late.replay(got.updates, wire.adapter_sha256)
    assert late.version == live.version and late.sha == live.sha
    for n in live.tensors:
        np.testing.assert_array_equal(late.optimizer.averaged(late.tensors)[n], live.optimizer.averaged(live.tensors)[n])


def test_history_round_trips_exactly_and_rejects_garbage():
    _, hist = _run(6)
    blob = hist.encode()
    back = History.decode(blob)
    assert back.base_version == 0 and back.base_sha == hist.base_sha and back.encode() == blob
    for a, b in zip(hist.updates, back.updates):
        assert a.adapter_sha256 == b.adapter_sha256 and a.mask == b.mask and a.dist == b.dist and a.lr == b.lr
        np.testing.assert_array_equal(a.coeffs, b.coeffs)
        assert a.head_grad == b.head_grad and a.head_codec == b.head_codec
    # compact: two hashes, then 12 B a seed, the int8 head (2 x (4 + 64)) and a small JSON index a round
    assert len(hist.encode(0, all_shas=False)) < 300 + 6 * (5 * 12 + 136 + 80)
    for bad in (b"", b"XXXX" + blob[4:], blob[:-1], blob + b"\0", blob[:8] + b"[" + blob[9:]):
        with pytest.raises(ValueError):
            History.decode(bad)
    with pytest.raises(ValueError):
        hist.append(hist.updates[0])  # versions must follow on
    with pytest.raises(ValueError):
        hist.since(7)


def test_catch_up_plan_replays_when_cheaper_and_snapshots_when_far_behind_or_diverged():
    live, hist = _run(10)
    lay = live.layout
    snap = len(live.to_bytes())
    near = catch_up_plan(hist, lay, 8, hist.sha_at(8), snap)
    assert near.how == "replay" and near.replay_bytes < snap
    # a device so slow that generating the directions costs more than the download
    slow = catch_up_plan(hist, lay, 0, hist.base_sha, snap, replay_entries_per_s=1.0)
    assert slow.how == "snapshot"
    assert replay_entries(lay, hist.since(0)) > 10 * 5 * 32 * 4  # K x the masked B entries, per round
    assert catch_up_plan(hist, lay, 3, "f" * 64, snap).how == "snapshot"  # diverged: the hash is not ours
    assert catch_up_plan(hist, lay, 11, hist.sha_at(10), snap).how == "snapshot"
    resumed = History(5, hist.sha_at(5), hist.updates[5:])  # a history that starts at a v1 checkpoint
    assert catch_up_plan(resumed, lay, 2, hist.sha_at(2), snap).how == "snapshot"
    assert catch_up_plan(resumed, lay, 6, hist.sha_at(6), snap).how == "replay"


@pytest.mark.parametrize("codec,tol", [("f32", 0.0), ("f16", 1e-3), ("int8", 1 / 127)])
def test_head_codecs_decode_identically_and_feed_their_error_back(codec, tol):
    rng = np.random.default_rng(1)
    shape = (2, 576)
    residual = None
    sent_sum = np.zeros(shape, np.float64)
    true_sum = np.zeros(shape, np.float64)
    for _ in range(50):
        g = rng.normal(size=shape).astype(np.float32) * np.array([[1.0], [1e-3]], np.float32)
        raw, residual = compress.encode(g, codec, residual)
        got = compress.decode(raw, codec, shape)
        np.testing.assert_array_equal(got, compress.decode(bytes(raw), codec, shape))  # the bytes are the contract
        if codec == "f32":
            assert residual is not None and not residual.any()
        sent_sum += got
        true_sum += g
    # error feedback: what rounding lost stays in the residual, so the sums differ by it alone
    np.testing.assert_allclose(sent_sum + residual, true_sum, rtol=0, atol=1e-4)
    per_round = {"f32": 4, "f16": 2, "int8": 1}[codec]
    assert len(raw) <= shape[0] * (shape[1] * per_round + 4)
    with pytest.raises(ValueError):
        compress.decode(raw[:-1], codec, shape)
    with pytest.raises(ValueError):
        compress.encode(np.zeros(3), codec)


def test_int8_decoding_is_a_pinned_function_of_the_bytes():
    raw = np.array([0.5, 2.0], "<f4").tobytes() + np.array([1, -127, 127, 3], np.int8).tobytes()
    assert compress.decode(raw, "int8", (2, 2)).tolist() == [[0.5, -63.5], [254.0, 6.0]]
    nan = np.array([np.nan, 1.0], "<f4").tobytes() + bytes(4)
    with pytest.raises(ValueError):
        compress.decode(nan, "int8", (2, 2))


def test_directions_of_a_history_are_the_contract_directions():
    """Replay needs nothing but the contract: the same masked directions the
    devices perturbed with (a guard against a history that stores tensors)."""
    _, hist = _run(2)
    up = hist.updates[0]
    lay = _layout()
    d = direction(int(up.seeds[0]), lay, PerturbMask.from_dict(up.mask), up.dist)
    assert set(d) == {"blk.1.attn_v.weight.lora_b"}


def test_a_version_1_frame_is_refused_with_the_version_in_the_message():
    from fwdllm.core.protocol import ProtocolError

    with pytest.raises(ProtocolError, match=r"unsupported protocol version 1 \(want 2\)"):
        Message.from_frames([b'{"v":1,"type":"hb"}'])
