"""Golden vectors and round trips for the contract: layout, directions, messages.

The golden values pin seed -> direction forever: if one of them changes, every
running federation would silently compute different updates on different
versions, so a change here must be a deliberate protocol bump.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from fwdllm.core.directions import combine, direction, tensor_direction
from fwdllm.core.layout import LoraLayout, PerturbMask, adapter_sha256
from fwdllm.core.protocol import Join, Message, ProtocolError, Result, Task, Update

GOLDEN = [
    # seed, name, shape, dist, first six values, sha256 of the little-endian float32 bytes
    (0, "blk.0.attn_q.weight.lora_a", (8, 576), "gaussian",
     [-0.0732879638671875, -0.2986907958984375, 1.6181793212890625, 0.4905853271484375, -0.207305908203125,
      -0.3487548828125],
     "cf4e1163e4c4261c0f33a496ac630d407ab9a28192cc7e28bcff2012c4ccd7a1"),
    (0, "blk.0.attn_q.weight.lora_a", (8, 576), "rademacher",
     [-1.0, -1.0, -1.0, 1.0, -1.0, -1.0],
     "0eb91527cb408d533bfc98f50df317bdf875037ea0e833933dfaa0012a8a455a"),
    (1, "blk.0.attn_q.weight.lora_b", (576, 8), "gaussian",
     [1.3069610595703125, -0.3389434814453125, 0.020233154296875, -0.4229278564453125, 0.382598876953125,
      0.193511962890625],
     "fdbc97ed0d83efca4a864ea73fca1b6d26931f70e5b9a6b992ef3aa9cdc09724"),
    (1, "blk.0.attn_q.weight.lora_b", (576, 8), "rademacher",
     [-1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
     "bf29421d1ed3f03311abf199472f85f528937afdb6fe39951fab7a06ccf64d79"),
    (2**32 - 1, "blk.29.attn_v.weight.lora_b", (192, 8), "gaussian",
     [-0.0039215087890625, 0.445037841796875, -2.438079833984375, 0.177337646484375, 1.0609588623046875,
      2.5670318603515625],
     "85b78939f49525b2094673ba12324773a4f32bcc20c1b9ab4007df5322bf11d7"),
    (2**32 - 1, "blk.29.attn_v.weight.lora_b", (192, 8), "rademacher",
     [-1.0, 1.0, -1.0, 1.0, -1.0, -1.0],
     "5abff9f2f63add30435b99466a7525cfff3a27531f9ec6767121aa285b1f01b3"),
]


@pytest.mark.parametrize("seed,name,shape,dist,first,digest", GOLDEN)
def test_golden_directions(seed, name, shape, dist, first, digest):
    v = tensor_direction(seed, name, shape, dist)
    assert v.dtype == np.float32 and v.shape == shape
    assert v.ravel()[:6].tolist() == first
    assert hashlib.sha256(v.astype("<f4").tobytes()).hexdigest() == digest


def test_direction_statistics_and_independence():
    g = tensor_direction(7, "x", (200_000,))
    assert abs(float(g.mean())) < 0.01 and abs(float(g.var()) - 1) < 0.02
    assert np.abs(g).max() <= 6.0
    r = tensor_direction(7, "x", (1001,), "rademacher")
    assert set(np.unique(r).tolist()) == {-1.0, 1.0}
    # different name or seed -> unrelated stream
    assert abs(np.corrcoef(g[:5000], tensor_direction(7, "y", (5000,)))[0, 1]) < 0.05
    assert abs(np.corrcoef(g[:5000], tensor_direction(8, "x", (5000,)))[0, 1]) < 0.05
    with pytest.raises(ValueError):
        tensor_direction(0, "x", (3,), "uniform")


def _layout() -> LoraLayout:
    shapes = {f"blk.{i}.attn_{t}.weight": (64 if t != "k" else 32, 64) for i in range(3) for t in "qkv"}
    return LoraLayout.for_base(shapes, rank=4, alpha=8, targets=["v", "q"])


def test_layout_order_and_roundtrip():
    lay = _layout()
    assert [t.target for t in lay.targets[:2]] == ["q", "v"]  # canonical order, not typed order
    assert LoraLayout.from_dict(lay.to_dict()) == lay
    assert lay.scale == 2.0
    with pytest.raises(ValueError):
        LoraLayout.for_base({"blk.0.attn_q.weight": (4, 4)}, 2, 2, ["gate"])
    with pytest.raises(ValueError):
        lay.check({})


def test_mask_selects_parts_layers_targets():
    lay = _layout()
    assert all(n.endswith("lora_b") for n in PerturbMask("b").names(lay))
    both = PerturbMask("both", layers=(1, 2), targets=("v",)).names(lay)
    assert both == ["blk.1.attn_v.weight.lora_a", "blk.1.attn_v.weight.lora_b"]
    assert PerturbMask.from_dict(PerturbMask("a", (0, 2), ("q",)).to_dict()) == PerturbMask("a", (0, 2), ("q",))
    with pytest.raises(ValueError):
        PerturbMask("c")


def test_combine_is_weighted_sum_of_directions():
    lay = _layout()
    mask = PerturbMask("both")
    out = combine([3, 5], [0.5, -2.0], lay, mask)
    d3, d5 = direction(3, lay, mask), direction(5, lay, mask)
    for n in lay.shapes():
        want = (0.5 * d3[n].astype(np.float64) - 2.0 * d5[n].astype(np.float64)).astype(np.float32)
        assert np.array_equal(out[n], want)
    only_b = combine([3], [1.0], lay, PerturbMask("b"))
    assert not any(only_b[n].any() for n in lay.shapes() if n.endswith("lora_a"))


def test_adapter_hash_depends_on_values_only():
    lay = _layout()
    t = lay.zeros()
    h0 = adapter_sha256(lay, t)
    t2 = {n: v.copy() for n, v in t.items()}
    t2["blk.0.attn_q.weight.lora_b"][0, 0] = 1e-7
    assert adapter_sha256(lay, t2) != h0 and adapter_sha256(lay, lay.zeros()) == h0


@pytest.mark.parametrize(
    "msg",
    [
        Join("dev-1", "ab" * 32, 512.5, 1 << 30, 16, 1000),
        Task(round=3, version=2, adapter_sha256="cd" * 32, seeds=np.array([1, 2**32 - 1], np.uint32), eps=1e-3),
        Result(round=3, seeds=np.array([1, 2], np.uint32), loss_plus=np.array([0.5, 0.25]),
               loss_minus=np.array([0.4, 0.3]), n_tokens=99, seconds=1.5),
        Update(round=1, version=2, lr=1e-3, adapter_sha256="0" * 64, seeds=np.arange(4, dtype=np.uint32),
               coeffs=np.linspace(-1, 1, 4)),
    ],
)
def test_message_roundtrip(msg):
    back = Message.from_frames(msg.to_frames())
    assert type(back) is type(msg)
    for k, v in vars(msg).items():
        got = getattr(back, k)
        assert np.array_equal(got, v) if isinstance(v, np.ndarray) else got == v


def test_fields_at_their_default_stay_off_the_wire():
    # a scalars-only Result carries no head fields and no blob frame; the
    # decoder restores the defaults, and set fields still travel
    plain = Result(round=3, seeds=np.array([1], np.uint32), loss_plus=np.array([0.5]), loss_minus=np.array([0.4]))
    frames = plain.to_frames()
    assert len(frames) == 1 and b"head" not in frames[0] and b"n_tokens" not in frames[0]
    back = Message.from_frames(frames)
    assert (back.head_grad, back.head_rows, back.n_tokens) == (b"", 0, 0)
    assert np.array_equal(back.seeds, plain.seeds) and np.array_equal(back.loss_plus, plain.loss_plus)
    headed = Message.from_frames(Result(1, plain.seeds, plain.loss_plus, plain.loss_minus, head_grad=b"\0" * 8,
                                        head_rows=2).to_frames())
    assert headed.head_grad == b"\0" * 8 and headed.head_rows == 2


@pytest.mark.parametrize(
    "frames",
    [
        [],
        [b"not json"],
        [b"[1,2]"],
        [b'{"v":99,"type":"hb"}'],
        [b'{"v":2,"type":"nope"}'],
        [b'{"v":2,"type":"join","client_id":"x"}'],  # missing fields
        [b'{"v":2,"type":"refuse","reason":5}'],  # wrong type
        [b'{"v":2,"type":"result","round":1,"loss_plus":"!!"}'],  # bad base64
        [b'{"v":2,"type":"result","round":1,"loss_plus":"AAAAAAAA+H8="}'],  # NaN
        [b'{"v":2,"type":"result","round":true}'],  # bool is not int
        [b'{"v":2,"type":"snapshot","version":1,"adapter_sha256":"x","state":{"blob":3}}'],  # no frame
        [b"{" + b" " * 70000 + b"}"],  # oversized header
    ],
)
def test_hostile_frames_raise_protocol_error(frames):
    with pytest.raises(ProtocolError):
        Message.from_frames(frames)
