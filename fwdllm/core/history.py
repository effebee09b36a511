"""The update history: every committed step, compactly, for replay.

Protocol v2 never ships tensors to a device that can rebuild them: the
round-0 adapter is a function of the init seed
(:func:`fwdllm.core.lora.initial_tensors`) and every later state is that plus
the replayed ``Update`` messages (seeds, coefficients, learning rate, mask,
distribution, the compressed head gradient).  The aggregator keeps them all
here - about 12 bytes per seed plus the head's bytes per round - saves them in
its checkpoint, and sends a device that is behind the slice it misses
(FedKSeed and DeComFL do the same), unless the cost model
(:func:`catch_up_plan`) finds a snapshot cheaper.

The binary form (:meth:`History.encode`) is ``b"FWH1"``, a little-endian
uint32 header length, a JSON header (versions, per-round counts, learning
rates, masks and distributions deduplicated, head lengths, hashes) and then
the seeds (``<u4``), the coefficients (``<f8``) and the head bytes, each
concatenated in round order.  No pickle; decoding validates every length.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field

import numpy as np

from fwdllm.core.layout import LoraLayout, PerturbMask
from fwdllm.core.protocol import Update

MAGIC = b"FWH1"


@dataclass
class History:
    """Consecutive ``Update`` messages from version ``base_version + 1`` on.

    ``base_sha`` is the adapter hash at ``base_version``: 0 and the init
    seed's adapter for a run that started here, or the checkpoint's version
    for a run resumed from a checkpoint that predates the history (protocol
    v1), which devices older than that reach by snapshot only.
    """

    base_version: int
    base_sha: str
    updates: list[Update] = field(default_factory=list)

    @property
    def version(self) -> int:
        return self.base_version + len(self.updates)

    def sha_at(self, version: int) -> str | None:
        """The adapter hash after ``version`` rounds, if the history covers it."""
        if version == self.base_version:
            return self.base_sha
        if self.base_version < version <= self.version:
            return self.updates[version - self.base_version - 1].adapter_sha256
        return None

    def append(self, update: Update) -> None:
        if update.version != self.version + 1:
            raise ValueError(f"history at version {self.version} cannot take update {update.version}")
        self.updates.append(update)

    def since(self, version: int) -> list[Update]:
        """The updates that take a replica at ``version`` to :attr:`version`."""
        if not self.base_version <= version <= self.version:
            raise ValueError(f"history covers versions {self.base_version}..{self.version}, not {version}")
        return self.updates[version - self.base_version:]

    # -- binary form ------------------------------------------------------ #

    def encode(self, from_version: int | None = None, all_shas: bool = True) -> bytes:
        """The updates after ``from_version`` (default: all) as bytes.

        ``all_shas=False`` keeps only the last hash: a replaying device checks
        where it lands, and 64 bytes a round would be most of a small replay.
        """
        start = self.base_version if from_version is None else from_version
        ups = self.since(start)
        masks: list[dict] = []
        dists: list[str] = []
        mask_ix, dist_ix = [], []
        for u in ups:
            if u.mask not in masks:
                masks.append(u.mask)
            if u.dist not in dists:
                dists.append(u.dist)
            mask_ix.append(masks.index(u.mask))
            dist_ix.append(dists.index(u.dist))
        shas = [u.adapter_sha256 for u in ups]
        header = {
            "from": start,
            "from_sha": self.sha_at(start),
            "n": [len(u.seeds) for u in ups],
            "round": [u.round for u in ups],
            "lr": [u.lr for u in ups],
            "masks": masks,
            "mask": mask_ix,
            "dists": dists,
            "dist": dist_ix,
            "head": [len(u.head_grad) for u in ups],
            "codec": [u.head_codec for u in ups],
            "sha": shas if all_shas else shas[-1:],
        }
        raw = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
        seeds = np.concatenate([np.asarray(u.seeds, "<u4") for u in ups] or [np.zeros(0, "<u4")])
        coeffs = np.concatenate([np.asarray(u.coeffs, "<f8") for u in ups] or [np.zeros(0, "<f8")])
        return b"".join([MAGIC, struct.pack("<I", len(raw)), raw, seeds.astype("<u4").tobytes(),
                         coeffs.astype("<f8").tobytes(), *(u.head_grad for u in ups)])

    @classmethod
    def decode(cls, data: bytes) -> "History":
        """Inverse of :meth:`encode`; ``ValueError`` on anything malformed.

        With only the last hash sent, the intermediate updates carry an empty
        ``adapter_sha256`` (:meth:`fwdllm.core.replica.Replica.replay` checks
        the end)."""
        try:
            if data[:4] != MAGIC:
                raise ValueError("not an update history")
            (n_head,) = struct.unpack_from("<I", data, 4)
            h = json.loads(data[8:8 + n_head])
            rounds = len(h["n"])
            if not all(len(h[k]) == rounds for k in ("round", "lr", "mask", "dist", "head", "codec")):
                raise ValueError("per-round lists differ in length")
            if len(h["sha"]) not in (rounds, min(rounds, 1)):
                raise ValueError("bad hash list")
            counts = [int(k) for k in h["n"]]
            heads = [int(k) for k in h["head"]]
            if min(counts + heads + [0]) < 0:
                raise ValueError("negative length")
            k_all = sum(counts)
            off = 8 + n_head
            end = off + 4 * k_all + 8 * k_all + sum(heads)
            if end != len(data):
                raise ValueError(f"{len(data)} bytes, the header describes {end}")
            seeds = np.frombuffer(data, "<u4", k_all, off).astype(np.uint32)
            coeffs = np.frombuffer(data, "<f8", k_all, off + 4 * k_all).astype(np.float64)
            if not np.all(np.isfinite(coeffs)):
                raise ValueError("non-finite coefficient")
            pos, hpos = 0, off + 12 * k_all
            shas = h["sha"] if len(h["sha"]) == rounds else [""] * (rounds - 1) + h["sha"]
            base = int(h["from"])
            updates = []
            for i in range(rounds):
                k, nb = counts[i], heads[i]
                updates.append(Update(
                    round=int(h["round"][i]), version=base + i + 1, lr=float(h["lr"][i]),
                    adapter_sha256=str(shas[i]), seeds=seeds[pos:pos + k], coeffs=coeffs[pos:pos + k],
                    mask=dict(h["masks"][h["mask"][i]]), dist=str(h["dists"][h["dist"][i]]),
                    head_grad=bytes(data[hpos:hpos + nb]), head_codec=str(h["codec"][i])))
                pos, hpos = pos + k, hpos + nb
            return cls(base, str(h["from_sha"] or ""), updates)
        except (KeyError, TypeError, IndexError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"bad update history: {e}") from None


# --------------------------------------------------------------------------- #
# replay or snapshot
# --------------------------------------------------------------------------- #

#: What the cost model assumes when a device did not say: a cellular link
#: (1 MB/s) and the direction throughput of a slow phone core (Irwin-Hall
#: entries per second; a 2-core Xeon under load does about 6e6).
DEFAULT_LINK_BYTES_PER_S = 1e6
DEFAULT_REPLAY_ENTRIES_PER_S = 3e6


@dataclass(frozen=True)
class CatchUpPlan:
    """How a device that is behind gets to the current version, and why."""

    how: str  # "replay" or "snapshot"
    replay_bytes: int
    replay_s: float  # estimated: transfer + the device's compute
    snapshot_bytes: int
    snapshot_s: float


def replay_entries(layout: LoraLayout, updates: list[Update]) -> int:
    """Direction entries a device generates to replay ``updates`` (the cost
    that dominates: the optimizer step is a few passes over the adapter)."""
    sizes = {n: int(np.prod(s)) for n, s in layout.shapes().items()}
    per_mask: dict[str, int] = {}
    total = 0
    for u in updates:
        key = json.dumps(u.mask, sort_keys=True)
        if key not in per_mask:
            per_mask[key] = sum(sizes[n] for n in PerturbMask.from_dict(u.mask).names(layout))
        total += len(u.seeds) * per_mask[key] + 3 * layout.n_params
    return total


def catch_up_plan(
    history: History,
    layout: LoraLayout,
    have_version: int,
    have_sha: str,
    snapshot_bytes: int,
    link_bytes_per_s: float = DEFAULT_LINK_BYTES_PER_S,
    replay_entries_per_s: float = DEFAULT_REPLAY_ENTRIES_PER_S,
) -> CatchUpPlan:
    """Replay when the device's state is on the history and replaying costs
    less time than a snapshot (bytes over the link, plus the device's compute
    for replay); else snapshot.

    A device whose ``(version, sha)`` the history does not know - diverged,
    or older than a history that starts at a v1 checkpoint - gets the
    snapshot whatever it costs.
    """
    snap_s = snapshot_bytes / link_bytes_per_s
    if history.sha_at(have_version) != have_sha or have_version > history.version:
        return CatchUpPlan("snapshot", 0, float("inf"), snapshot_bytes, snap_s)
    blob = len(history.encode(have_version, all_shas=False))
    replay_s = blob / link_bytes_per_s + replay_entries(layout, history.since(have_version)) / replay_entries_per_s
    how = "replay" if replay_s <= snap_s else "snapshot"
    return CatchUpPlan(how, blob, replay_s, snapshot_bytes, snap_s)
