"""Placement of weights in tiers under a memory budget.

Tiers, fastest first:
  dense       resident on the device, decompressed once at load
  compressed  resident on the device, still compressed: decompressed into a slot at each use
  host        compressed in host memory (pinned on CUDA): copied and decompressed at each use
  disk        compressed in the checkpoint files: read (bypassing the page cache) at each use

The planner puts the non-layer weights (embeddings, norms, lm_head) on the device first, reserves the
streaming buffers (dense slots or a scratch matrix, and read buffers), then makes as many decoder layers resident as fit,
compressed first (it lets more fit), spread evenly over the stack (`resident_order`: every streamed layer
is then read while resident layers compute), then upgrades layers to dense with what is left.

Mixture-of-experts layers are planned in two parts: the layer's base (attention, norms, router,
shared experts), which every token uses, and its experts, of which a token uses a few. Bases are
placed like whole layers above; the experts share one pool of expert slots (runtime/expert_cache.py):
at least MIN_EXPERT_SLOTS (one computing, one being read), and every byte the resident bases leave
over. A pool that holds every expert makes the model fully resident.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..io import buffer_size_for
from ..store import Checkpoint
from .budget import BudgetError, format_bytes

RESIDENT = ("dense", "compressed")
MIN_EXPERT_SLOTS = 2


@dataclass(frozen=True)
class Plan:
    budget: int | None  # bytes, None = unlimited
    storage: str  # where streamed layers come from: "disk" | "host"
    tiers: tuple[str, ...]  # per decoder layer
    fixed_bytes: int  # non-layer weights, dense on the device
    layer_dense_bytes: tuple[int, ...]
    layer_stored_bytes: tuple[int, ...]
    nslots: int  # dense slots streamed layers are decompressed into
    slot_bytes: int  # bytes of one slot (the largest layer, dense)
    nreadbufs: int  # buffers compressed layers are read into (disk tier)
    readbuf_bytes: int
    scratch_bytes: int  # CPU: one dense matrix, for decompress + matmul at large batch
    minimum_bytes: int  # the smallest budget that works (everything streamed)
    notes: list[str] = field(default_factory=list)
    expert_slots: int = 0  # experts held in memory at once (MoE layers; see module docstring)
    expert_slot_bytes: int = 0
    num_experts: int = 0  # experts of all layers together
    pinned_bytes: int = 0  # small tensors held besides their streamed layer (the routers, for prediction)

    @property
    def streamed(self) -> list[int]:
        return [i for i, t in enumerate(self.tiers) if t != "dense"]

    def count(self, tier: str) -> int:
        return sum(t == tier for t in self.tiers)

    @property
    def device_bytes(self) -> int:
        """Everything the budget covers: resident weights plus streaming buffers."""
        total = (self.fixed_bytes + self.nslots * self.slot_bytes + self.nreadbufs * self.readbuf_bytes
                 + self.scratch_bytes + self.expert_slots * self.expert_slot_bytes + self.pinned_bytes)
        for t, d, s in zip(self.tiers, self.layer_dense_bytes, self.layer_stored_bytes):
            total += d if t == "dense" else s if t == "compressed" else 0
        return total

    @property
    def host_bytes(self) -> int:
        """Compressed layers held in host memory outside the budget (storage='host')."""
        return sum(s for t, s in zip(self.tiers, self.layer_stored_bytes) if t == "host")

    def summary(self) -> str:
        b = "unlimited" if self.budget is None else format_bytes(self.budget)
        what = "layers" if not self.num_experts else "layer bases"
        split = ""
        if self.num_experts:
            layers = sum(s for t, s in zip(self.tiers, self.layer_stored_bytes) if t == "compressed") + \
                sum(d for t, d in zip(self.tiers, self.layer_dense_bytes) if t == "dense")
            split = (f"; split: {format_bytes(self.fixed_bytes + self.pinned_bytes)} embeddings/norms/head/routers, "
                     f"{format_bytes(layers)} resident layer bases, "
                     f"{format_bytes(self.expert_slots * self.expert_slot_bytes)} expert cache "
                     f"({self.expert_slots} of {self.num_experts} experts), "
                     f"{format_bytes(self.nslots * self.slot_bytes + self.nreadbufs * self.readbuf_bytes + self.scratch_bytes)} "
                     f"streaming buffers")
        return (f"budget {b}: {self.count('dense')} {what} dense, {self.count('compressed')} compressed resident, "
                f"{self.count('host')} from host memory, {self.count('disk')} from disk; "
                f"device weights {format_bytes(self.device_bytes)} (minimum {format_bytes(self.minimum_bytes)}){split}")


def layer_sizes(ckpt: Checkpoint, per_expert: frozenset[int] = frozenset()) -> tuple[list[int], list[int], list[int]]:
    """Per layer: dense bytes, stored bytes, read-buffer bytes (aligned range covering the layer).

    For a layer in `per_expert` (its experts are read one by one): of its base (the experts are
    planned as a pool, see module docstring)."""
    dense, stored, readbuf = [], [], []
    for i in range(ckpt.num_layers):
        moe = i in per_expert
        dense.append(ckpt.dense_bytes(ckpt.base_params(i) if moe else ckpt.layer_tensors(i)))
        _, start, end = ckpt.base_range(i) if moe else ckpt.layer_range(i)
        stored.append(end - start)
        readbuf.append(buffer_size_for(start, end))
    return dense, stored, readbuf


def make_plan(ckpt: Checkpoint, budget: int | None, storage: str = "disk", nslots: int = 2, nreadbufs: int = 2,
              slots: bool = False, exclude: frozenset[str] = frozenset(), prefer_dense: bool = True,
              pinned: frozenset[str] = frozenset(), per_expert: frozenset[int] = frozenset(),
              compressed: frozenset[str] = frozenset()) -> Plan:
    """Fill the budget (bytes) as described in the module docstring; BudgetError if it cannot work.

    With `slots` (CUDA) a streamed layer is decompressed whole into one of `nslots` dense slots (on
    a side stream, overlapping compute). Without (CPU) there are no slots: linear layers multiply
    from the compressed bytes where they lie (fused kernel), or decompress one matrix at a time into
    a scratch buffer the size of the largest matrix for large batches.

    `exclude`: non-layer tensors that are not held in memory (embeddings read by row on demand).
    `compressed`: non-layer tensors held in their stored form (a quantized output head), counted so.
    `prefer_dense`: upgrade resident layers to dense when the budget allows. Off on a CPU with the
    fused kernel, where a compressed layer is both smaller and faster to multiply at decode time.

    Residency comes first: the pipeline is as deep as `nslots` / `nreadbufs` allow without making
    fewer layers resident than the shallowest pipeline would. A deeper pipeline overlaps more; a
    resident layer is not read at all. One exception on the CPU: a second read buffer is taken
    whenever the budget has room for it, even at the cost of a resident layer. With one buffer the
    next read cannot start until the layer in it has been computed, so the disk idles for the whole
    compute time of every streamed layer; with two it reads layer n + 1 while layer n computes.

    `pinned`: layer tensors also held on their own, outside their layer (the routers of MoE layers).
    `per_expert`: MoE layers whose experts are read one by one (runtime/experts.py); the other
    layers, MoE or not, stream whole.
    """
    if storage not in ("disk", "host"):
        raise BudgetError(f"storage must be 'disk' or 'host', got {storage!r}")
    cpu = not slots
    cands = ((0, 1), (0, 2), (0, nreadbufs)) if cpu else ((1, 1), (2, 1), (2, 2), (nslots, nreadbufs))
    depths = sorted({(min(k, nslots) if not cpu else 0, max(min(r, nreadbufs), 1)) for k, r in cands})
    kw = dict(cpu=cpu, exclude=exclude, prefer_dense=prefer_dense, pinned=pinned, per_expert=per_expert,
              compressed=compressed)
    base = _plan(ckpt, budget, storage, *depths[0], **kw)  # raises BudgetError stating the true minimum
    best = base
    resident = lambda p: sum(t in RESIDENT for t in p.tiers)  # noqa: E731
    floor = resident(base)
    if cpu and storage == "disk" and (0, 2) in depths:  # double buffering first (see above)
        try:
            best = _plan(ckpt, budget, storage, 0, 2, **kw)
            floor = resident(best)
        except BudgetError:
            pass
    for k, r in depths[1:]:
        try:
            p = _plan(ckpt, budget, storage, k, r, **kw)
        except BudgetError:
            continue
        if resident(p) >= floor:
            best = p
    return dataclasses.replace(best, minimum_bytes=base.minimum_bytes)


def resident_order(stored: list[int], avail: int) -> list[int]:
    """The order in which layers are offered residency: first the k layers that fit in layer order,
    moved to evenly spaced positions (k of n: the (j + 1/2) n / k-th), then every other layer.

    Spread out, each streamed layer is read while the resident layers before it compute; as a
    prefix (or suffix) the disk would idle through all the resident layers, with at most the read
    buffers' worth read ahead."""
    n, k, room = len(stored), 0, avail
    for b in stored:
        if b > room:
            break
        room, k = room - b, k + 1
    spread = sorted({min(n - 1, int((j + 0.5) * n / k)) for j in range(k)}) if 0 < k < n else []
    taken = set(spread)
    return spread + [i for i in range(n) if i not in taken]


def scratch_bytes(ckpt: Checkpoint) -> int:
    """Dense bytes of the largest bitmap-encoded matrix inside the decoder layers (an expert's slice for experts)."""
    entries = (sub for t in ckpt.tensors.values() if t.layer is not None
               for sub in (t.experts if getattr(t, "experts", None) is not None else [t]))
    return max((t.dense_bytes for t in entries if t.encoding != "dense"), default=0)


def _plan(ckpt: Checkpoint, budget: int | None, storage: str, nslots: int, nreadbufs: int, cpu: bool,
          exclude: frozenset[str], prefer_dense: bool, pinned: frozenset[str], per_expert: frozenset[int],
          compressed: frozenset[str] = frozenset()) -> Plan:
    n = ckpt.num_layers
    dense, stored, readbuf = layer_sizes(ckpt, per_expert)
    held = [t for t in ckpt.non_layer_tensors() if t not in exclude]
    fixed = ckpt.dense_bytes([t for t in held if t not in compressed]) + ckpt.stored_bytes([t for t in held if t in compressed])
    moe = bool(per_expert)
    if moe:
        from .expert_cache import expert_slot_bytes

        total_experts = sum(ckpt.num_experts(i) for i in per_expert)
        eslot = expert_slot_bytes(ckpt, sorted(per_expert))
        # on a CPU, host storage uses the experts where they lie in host memory: no slots
        min_eslots = 0 if (storage == "host" and cpu) else min(MIN_EXPERT_SLOTS, total_experts)
        pin = ckpt.dense_bytes(sorted(pinned))
        full_dense = fixed + sum(ckpt.dense_bytes(ckpt.layer_tensors(i)) for i in range(n))
        if prefer_dense and (budget is None or budget >= full_dense):  # transformers' own dense model
            return Plan(budget=budget, storage=storage, tiers=("dense",) * n, fixed_bytes=fixed,
                        layer_dense_bytes=tuple(ckpt.dense_bytes(ckpt.layer_tensors(i)) for i in range(n)),
                        layer_stored_bytes=tuple(stored), nslots=0, slot_bytes=0, nreadbufs=0, readbuf_bytes=0,
                        scratch_bytes=0, minimum_bytes=full_dense)
        prefer_dense = False  # bases stay compressed: the budget goes to the expert cache
    else:
        total_experts = eslot = min_eslots = pin = 0
    reserve = pin + min_eslots * eslot  # extra expert slots come from what is left
    slot = max(dense, default=0)
    rbuf = max(readbuf, default=0)
    scratch = scratch_bytes(ckpt) if cpu else 0
    reads = storage == "disk"
    stream_cost = nslots * slot + (nreadbufs * rbuf if reads else 0) + scratch + reserve
    minimum = fixed + stream_cost
    common = dict(budget=budget, storage=storage, fixed_bytes=fixed, layer_dense_bytes=tuple(dense),
                  layer_stored_bytes=tuple(stored), minimum_bytes=minimum)
    if prefer_dense and (budget is None or budget >= fixed + sum(dense)):
        return Plan(tiers=("dense",) * n, nslots=0, slot_bytes=0, nreadbufs=0, readbuf_bytes=rbuf, scratch_bytes=0, **common)
    if budget is not None and budget < minimum:
        parts = [f"{format_bytes(fixed)} of embeddings/norms/head"]
        if nslots:
            parts.append(f"{nslots} x {format_bytes(slot)} decompression slots")
        if reads:
            parts.append(f"{nreadbufs} x {format_bytes(rbuf)} read buffers")
        if scratch:
            parts.append(f"{format_bytes(scratch)} scratch for the largest matrix")
        if min_eslots:
            parts.append(f"{min_eslots} x {format_bytes(eslot)} expert slots")
        if pin:
            parts.append(f"{format_bytes(pin)} of routers")
        raise BudgetError(f"memory budget {format_bytes(budget)} is below the minimum {format_bytes(minimum)} "
                          f"for this model ({' + '.join(parts)})", minimum_bytes=minimum)
    tiers = ["disk" if reads else "host"] * n
    avail = (budget if budget is not None else fixed + stream_cost + sum(stored)) - fixed - stream_cost
    for i in resident_order(stored, avail):  # as many layers resident as fit, compressed, spread out
        if stored[i] <= avail:
            tiers[i], avail = "compressed", avail - stored[i]
    nreadbufs_used = nreadbufs if reads else 0
    if all(t == "compressed" for t in tiers) and reads:
        avail += nreadbufs * rbuf  # nothing is read from disk any more: no read buffers
        nreadbufs_used = 0
    for i in range(n if prefer_dense else 0):  # then upgrade to dense with what is left
        if tiers[i] == "compressed" and dense[i] - stored[i] <= avail:
            tiers[i], avail = "dense", avail - (dense[i] - stored[i])
    streaming = any(t != "dense" for t in tiers)
    nslots_used = nslots if streaming else 0
    eslots = min_eslots
    if min_eslots:  # every byte left holds more experts (all of them without a budget)
        extra = total_experts if budget is None else max(avail, 0) // eslot
        eslots = min(total_experts, min_eslots + extra)
    return Plan(tiers=tuple(tiers), nslots=nslots_used, slot_bytes=slot if nslots_used else 0,
                nreadbufs=nreadbufs_used if streaming else 0, readbuf_bytes=rbuf,
                scratch_bytes=scratch if (streaming or moe) else 0, expert_slots=eslots, expert_slot_bytes=eslot,
                num_experts=total_experts, pinned_bytes=pin, **common)
