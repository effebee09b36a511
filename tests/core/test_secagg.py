"""Secure aggregation (``--secagg``) as a pure state machine: the server gets
the sum of the clients' vectors to fixed-point precision, recovers it when
clients drop after masking, and never holds one client's unmasked vector."""

from __future__ import annotations

import numpy as np
import pytest

from fwdllm.core.secagg import (
    SecAggClient,
    SecAggError,
    SecAggParams,
    SecAggServer,
    decode_fixed,
    encode_fixed,
    pack_unmask,
    unpack_map,
)


def _round(xs: list[np.ndarray], drop_after_shares: set[int] = frozenset(), params: SecAggParams | None = None,
           record: list[bytes] | None = None):
    """One whole round; clients in ``drop_after_shares`` never send their
    masked vector.  ``record`` collects every byte string the server received."""
    n = len(xs)
    params = params or SecAggParams(n=n, threshold=SecAggParams.default_threshold(n), length=len(xs[0]), round=3)
    rec = record if record is not None else []
    clients = {u: SecAggClient(params, u) for u in range(1, n + 1)}
    server = SecAggServer(params)
    for u, c in clients.items():
        rec.append(c.keys())
        server.add_keys(u, rec[-1])
    for u, c in clients.items():
        rec.append(c.shares(server.roster(u)))
        server.add_shares(u, rec[-1])
    for u, c in clients.items():
        masked = c.mask(xs[u - 1], server.inbox(u))
        if u not in drop_after_shares:
            rec.append(masked)
            server.add_masked(u, masked)
    request = server.unmask_request()
    for u in sorted(server.vectors):
        rec.append(clients[u].reveal(request))
        server.add_reveal(u, rec[-1])
    return server.total(), params, clients, server


def test_the_aggregate_is_the_plain_sum_to_fixed_point_precision():
    rng = np.random.default_rng(0)
    xs = [rng.normal(scale=50, size=37) for _ in range(4)]
    total, params, _, _ = _round(xs)
    assert np.abs(total - np.sum(xs, axis=0)).max() <= 4 * 2.0 ** -(params.frac_bits + 1)


def test_one_of_four_dropping_after_masking_still_gives_the_survivors_sum():
    rng = np.random.default_rng(1)
    xs = [rng.normal(size=21) for _ in range(4)]
    total, params, _, server = _round(xs, drop_after_shares={2})
    assert server.request == ([1, 3, 4], [2])
    np.testing.assert_allclose(total, xs[0] + xs[2] + xs[3], rtol=0, atol=3 * 2.0**-params.frac_bits)


def test_the_server_never_holds_an_unmasked_vector():
    """Everything the server receives, byte for byte, against each client's
    fixed-point vector: no payload contains it, and a masked vector looks
    uniform (its entries span the ring, unlike small fixed-point values)."""
    rng = np.random.default_rng(2)
    xs = [rng.normal(size=64) for _ in range(4)]
    rec: list[bytes] = []
    total, params, _, server = _round(xs, record=rec)
    for x in xs:
        plain = encode_fixed(x, params).astype("<u8").tobytes()
        assert not any(plain[:64] in blob for blob in rec)
    for u, y in server.vectors.items():
        assert not np.array_equal(y, encode_fixed(xs[u - 1], params))
        assert np.abs(decode_fixed(y, params)).min() > 1e6  # far outside any honest value
    np.testing.assert_allclose(total, np.sum(xs, axis=0), atol=1e-6)


def test_clients_refuse_what_would_unmask_one_of_them():
    rng = np.random.default_rng(3)
    xs = [rng.normal(size=5) for _ in range(4)]
    params = SecAggParams(n=4, threshold=3, length=5, round=1)
    clients = {u: SecAggClient(params, u) for u in range(1, 5)}
    server = SecAggServer(params)
    for u, c in clients.items():
        server.add_keys(u, c.keys())
    for u, c in clients.items():
        server.add_shares(u, c.shares(server.roster(u)))
    for u, c in clients.items():
        server.add_masked(u, c.mask(xs[u - 1], server.inbox(u)))
    with pytest.raises(SecAggError):  # both the self-mask seed and the key of participant 2
        clients[1].reveal(pack_unmask([1, 2, 3], [2]))
    with pytest.raises(SecAggError):  # fewer survivors than the threshold
        clients[1].reveal(pack_unmask([1, 3], [2, 4]))
    out = unpack_map(clients[1].reveal(pack_unmask([1, 2, 3, 4], [])))
    assert sorted(out) == [1, 2, 3, 4] and all(len(b) == 4 + 16 for b in out.values())
    with pytest.raises(SecAggError):  # once only
        clients[1].reveal(pack_unmask([1, 2, 3, 4], []))
    with pytest.raises(SecAggError):  # an out-of-range input is refused before masking
        SecAggClient(params, 2).mask(np.full(5, 2e6), b"")
    with pytest.raises(SecAggError):
        encode_fixed(np.full(5, 2e6), params)
    with pytest.raises(SecAggError):  # a ring too small for n x bound
        SecAggParams(n=1000, threshold=17, length=1, round=0, frac_bits=40, bound=1e6)
    with pytest.raises(SecAggError):  # a minority threshold
        SecAggParams(n=4, threshold=2, length=1, round=0)


def test_a_tampered_envelope_does_not_open():
    params = SecAggParams(n=3, threshold=2, length=2, round=0)
    clients = {u: SecAggClient(params, u) for u in (1, 2, 3)}
    server = SecAggServer(params)
    for u, c in clients.items():
        server.add_keys(u, c.keys())
    for u, c in clients.items():
        server.add_shares(u, c.shares(server.roster(u)))
    inbox = unpack_map(server.inbox(1))
    inbox[2] = inbox[2][:-1] + bytes([inbox[2][-1] ^ 1])
    from fwdllm.core.secagg import pack_map

    clients[1].mask(np.zeros(2), pack_map(inbox))
    with pytest.raises(SecAggError):
        clients[1].reveal(pack_unmask([1, 2, 3], []))


def test_secagg_plus_graph_at_40_clients_survives_three_dropouts():
    """Past 21 participants each one masks with and shares among a
    logarithmic neighbourhood only (SecAgg+), and the sum still comes out."""
    rng = np.random.default_rng(4)
    xs = [rng.normal(size=9) for _ in range(40)]
    total, params, _, server = _round(xs, drop_after_shares={5, 17, 33})
    assert params.degree == 2 * 8 and params.threshold == 9
    hoods = [params.neighbours(u) for u in range(1, 41)]
    assert all(len(h) == params.degree for h in hoods)
    assert all(u in hoods[v - 1] for u in range(1, 41) for v in hoods[u - 1])  # symmetric
    keep = [x for u, x in enumerate(xs, 1) if u not in {5, 17, 33}]
    np.testing.assert_allclose(total, np.sum(keep, axis=0), rtol=0, atol=40 * 2.0**-params.frac_bits)


def test_secagg_bench_smoke(tmp_path):
    import json

    from click.testing import CliRunner

    from fwdllm.bench.secagg import secagg

    res = CliRunner().invoke(secagg, ["--counts", "3,5", "--lengths", "4", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    rows = json.loads((tmp_path / "secagg.json").read_text())["rounds"]
    assert [r["clients"] for r in rows] == [3, 5] and all(r["bytes_per_client"] > 0 for r in rows)
