"""The streaming schedule: compressed layers flow through a few dense slots while earlier layers compute.

Every use of a streamed layer gets a sequence number n (layer order[n % len(order)], cycling over
forward passes). Three actors work on consecutive n at once:

    reader        for n = 0, 1, ...:  read(n)        -> readbuf[n % R]   (waits: buffer freed by decompress(n - R))
    decompressor  for n = 0, 1, ...:  decompress(n)  -> slot[n % K]      (waits: read(n), release(n - K))
    compute       for n = 0, 1, ...:  wait(n); compute(n); release(n)   (the decoder layer's forward)

so from the compute side the loop reads `prefetch(n+1..n+K-1); wait(n); compute(n); release(n)`: the
prefetch is the two threads running ahead, bounded by K slots and R read buffers. Layers resident
compressed (or in host memory) skip the read (and where every layer is resident on the CPU there are
no threads at all: wait(n) hands out the layer's views, made once); disk layers are read with direct I/O and their checksum
is verified before anything is decompressed. On CUDA the copy to the device and the decompression
run on a side stream; a slot is reused only after the compute stream has finished with it (event).

On the CPU (no slots, "views" mode) there is no decompression stage at all: the compute side gets
the compressed views themselves (from the read buffer, or the resident bytes) and the layer's
linear layers multiply straight from the bitmap format (`kernels.sparse_matmul`), reading 9 bits
per weight instead of writing and re-reading 16, or decompress one matrix at a time into a scratch
buffer for large batches. A read buffer is then held until release(n).

If layers are ever used out of order (a forward pass that raised, a model that skips layers), the
pipeline drains and restarts at the requested layer: it can never hand out a slot holding the wrong layer.
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field

import torch

from ..format import BitmapTensor
from ..io import FileReader, aligned_empty
from ..store import Checkpoint
from .whole_experts import whole_experts


@dataclass
class LayerSource:
    """Where the compressed bytes of one streamed layer come from."""

    index: int
    tier: str  # "compressed" | "host" | "disk"
    base: bool = False  # a layer with experts: only its base range streams here (experts: ExpertCache)
    data: torch.Tensor | None = None  # resident bytes [data_start, data_end) (compressed / host tiers)
    reader: FileReader | None = None  # disk tier
    start: int = 0
    end: int = 0


@dataclass
class PipelineStats:
    bytes_read: int = 0  # from disk
    bytes_copied: int = 0  # host -> device (CUDA)
    read_s: float = 0.0  # time with at least one disk read in flight
    decompress_s: float = 0.0  # decompressor thread busy
    wait_s: float = 0.0  # compute side blocked in wait(n)
    uses: int = 0  # layer uses served
    restarts: int = 0
    per_layer_wait: dict = field(default_factory=dict)


def _decompress_fn():
    try:
        from ..kernels import decompress  # native CPU / Triton kernels when built
    except ImportError:
        from ..format import decode

        def decompress(bt, out=None, threads=None):  # noqa: ARG001 - same signature as the kernels
            return decode(bt, out=out)

    return decompress


def _drain(items) -> None:
    """Wait for the reads of items still in flight, whatever their outcome."""
    for item in items:
        pending = item.get("pending")
        if pending is not None:
            try:
                pending.result()
            except OSError:
                pass


class Pipeline:
    """Streams the layers in `sources` (in order) through `nslots` dense slots on `device`.

    slot_shapes: {name relative to the layer ("mlp.up_proj.weight"): (numel, dtype)} large enough for
    every streamed layer. acquire(i) returns {relative name: dense tensor view} for layer i.
    """

    def __init__(self, ckpt: Checkpoint, sources: list[LayerSource], device: torch.device, nslots: int, nreadbufs: int,
                 readbuf_bytes: int, slot_shapes: dict, verify: bool = True, decompress_threads: int | None = None):
        self.ckpt = ckpt
        self.sources = sources
        self.order = [s.index for s in sources]
        self.pos = {s.index: p for p, s in enumerate(sources)}
        self.device = device
        self.K, self.R = nslots, nreadbufs
        self.verify = verify
        self.cuda = device.type == "cuda"
        self.decompress = _decompress_fn()
        self.decompress_threads = decompress_threads
        self.prefix = {s.index: f"{ckpt.layers_prefix}.{s.index}." for s in sources}
        # dense slots: one tensor per relative parameter name, sized for the largest layer
        # Each slot is one raw byte buffer carved into a typed region per parameter.
        layout, nbytes = {}, 0
        for rel, (numel, dt) in slot_shapes.items():
            nbytes += (-nbytes) % 64
            layout[rel] = (nbytes, numel, dt)
            nbytes += numel * dt.itemsize
        self.slot_raw = [aligned_empty(nbytes) if not self.cuda else torch.empty(nbytes, dtype=torch.uint8, device=device)
                         for _ in range(nslots)]
        self.slots = [{rel: raw[off : off + numel * dt.itemsize].view(dt) for rel, (off, numel, dt) in layout.items()}
                      for raw in self.slot_raw]
        any_disk = any(s.tier == "disk" for s in sources)
        self.readbufs = [aligned_empty(readbuf_bytes, pin=self.cuda) for _ in range(nreadbufs)] if any_disk else []
        any_copy = self.cuda and any(s.tier in ("disk", "host") for s in sources)
        stage_bytes = max((s.end - s.start for s in sources), default=0)
        self.staging = [torch.empty(stage_bytes, dtype=torch.uint8, device=device) for _ in range(max(nreadbufs, 1))] if any_copy else []
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.slot_free_event: list = [None] * nslots
        self.stats = PipelineStats()
        self._resident_views: dict[int, dict] = {}  # layer -> views of its resident bytes (see _views)
        # "slots": decompress whole layers into dense slots (CUDA); "views": hand out the compressed views
        self.mode = "slots" if nslots else "views"
        # views of layers all resident: nothing to read or decompress, so no threads: acquire hands out
        # the views made once (threads woken at every layer would take the cores from the kernels)
        self.direct = self.mode == "views" and not any_disk
        self._direct_views: dict[int, dict] = {}
        self.cv = threading.Condition()
        self.threads: list[threading.Thread] = []
        self._reset(base=0)

    # -- state, guarded by self.cv
    def _reset(self, base: int) -> None:
        self.base = base  # position in `order` of sequence number 0
        self.read_n = 0  # reads completed: n < read_n
        self.decomp_n = 0  # decompressions completed
        self.released_n = 0  # slots released by compute
        self.cur = 0  # next n the compute side will use
        self.pending: dict[int, dict] = {}  # n -> stored views of layer(n), read and verified
        self.error: BaseException | None = None
        self.stop = False
        self.broken = False  # a stage failed: the next acquire restarts from scratch
        self.done_layer: dict[int, int] = {}  # n -> the layer its slot (or views) now holds
        self.views_ready: dict[int, dict] = {}  # n -> compressed views (views mode)
        self.disk_reads = 0  # views mode: disk reads started (the k-th uses readbuf[k % R])
        self.disk_released = 0  # views mode: disk reads whose buffer compute has released
        self.disk_of: dict[int, int] = {}  # n -> k
        self._read_until = 0.0  # end of the last read counted in stats.read_s

    def layer_of(self, n: int) -> int:
        return self.order[(self.base + n) % len(self.order)]

    def start(self) -> None:
        if self.threads or not self.order or self.direct:
            return
        self.threads = [threading.Thread(target=self._reader, name="sparseferry-reader", daemon=True),
                        threading.Thread(target=self._decompressor, name="sparseferry-decompress", daemon=True)]
        for t in self.threads:
            t.start()

    def shutdown(self) -> None:
        with self.cv:
            self.stop = True
            self.cv.notify_all()
        for t in self.threads:
            t.join()
        self.threads = []
        _drain(self.pending.values())  # no read may still be filling a buffer the next start reuses

    def close(self) -> None:
        self.shutdown()
        for s in self.sources:
            if s.reader is not None:
                s.reader.close()

    def _wait_for(self, pred) -> bool:
        """Wait (holding cv) until pred() or stop; False if stopped."""
        while not pred():
            if self.stop:
                return False
            self.cv.wait(0.1)
        return not self.stop

    def _fail(self, e: BaseException) -> None:
        """A stage failed: the compute side raises `e` at its next wait."""
        with self.cv:
            self.error = e
            self.cv.notify_all()

    # -- reader thread: read(n) for n = 0, 1, ...
    def _reader(self) -> None:
        n = 0
        while True:
            with self.cv:
                disk = self.sources[self.pos[self.layer_of(n)]].tier == "disk"
                if self.mode == "views":
                    # A disk read takes readbuf[k % R] (k counts disk reads), free once compute released
                    # disk read k - R. Resident layers take no buffer: they may run ahead a whole pass.
                    k = self.disk_reads
                    ok = (lambda: k - self.disk_released < len(self.readbufs)) if disk else \
                         (lambda: n - self.released_n < len(self.order))
                else:
                    # readbuf[n % R] is free once decompress(n - R) has consumed it.
                    k = n
                    ok = lambda: n - self.decomp_n < max(self.R, 1)  # noqa: E731
                if not self._wait_for(ok):
                    return
                if disk and self.mode == "views":
                    self.disk_of[n] = k
                    self.disk_reads = k + 1
            try:
                item = self._read(n, self.readbufs[k % len(self.readbufs)] if disk else None)
            except BaseException as e:  # noqa: BLE001 - handed to the compute side
                return self._fail(e)
            with self.cv:
                if self.stop:
                    _drain([item])
                    return
                self.pending[n] = item
                self.read_n = n + 1
                self.cv.notify_all()
            n += 1

    def _read(self, n: int, buf: torch.Tensor | None) -> dict:
        """Start read(n): resident bytes as they are, an expert layer's base read and verified here,
        any other disk layer queued (`FileReader.submit`): the reader goes on to the next read while
        this one is in flight, and the decompressor waits for its bytes and verifies them."""
        src = self.sources[self.pos[self.layer_of(n)]]
        if src.tier != "disk":
            return {"data": src.data, "index": src.index}
        if src.base:  # verified as it is read
            t0 = time.perf_counter()
            data = self.ckpt.read_base(src.index, buf, reader=src.reader) if self.verify else \
                src.reader.read_range(src.start, src.end, buf)
            self._count_read(t0, time.perf_counter(), src.end - src.start)
            return {"data": data, "index": src.index}
        return {"pending": src.reader.submit(src.start, src.end, buf), "index": src.index, "verify": self.verify}

    def _count_read(self, t0: float, t1: float, nbytes: int) -> None:
        """Statistics of a read in flight over [t0, t1]: read_s counts the time with any read in flight."""
        with self.cv:
            st = self.stats
            st.read_s += max(0.0, t1 - max(t0, self._read_until))
            self._read_until = max(self._read_until, t1)
            st.bytes_read += nbytes

    def _collect(self, item: dict) -> dict:
        """The read bytes of item (waiting for a read still in flight)."""
        pending = item.pop("pending", None)
        if pending is not None:
            item["data"] = pending.result()
            self._count_read(pending.submitted, pending.finished, pending.nbytes)
        return item

    # -- decompressor thread: decompress(n) for n = 0, 1, ...
    def _decompressor(self) -> None:
        n = 0
        while True:
            with self.cv:
                views = self.mode == "views"  # views: the reader already bounds what is held
                slots = len(self.order) if views else self.K
                if not self._wait_for(lambda: n < self.read_n and n - self.released_n < slots):
                    return
                item = self.pending.pop(n)
            try:
                item = self._collect(item)
                if views:
                    v = self._views(item["index"], item["data"], verify=item.get("verify", False))
                    with self.cv:
                        self.views_ready[n] = v
                else:
                    self._decompress_into(n, item)
            except BaseException as e:  # noqa: BLE001 - handed to the compute side
                return self._fail(e)
            with self.cv:
                if self.stop:
                    return
                self.done_layer[n] = item["index"]
                self.decomp_n = n + 1
                self.cv.notify_all()
            n += 1

    def _decompress_into(self, n: int, item: dict) -> None:
        t0 = time.perf_counter()
        i, data = item["index"], item["data"]
        slot = self.slots[n % self.K]
        if self.cuda:
            if item.get("verify"):  # the checksums, before any byte goes to the device
                self.ckpt.layer_views(i, data, verify=True)
            ev = self.slot_free_event[n % self.K]
            with torch.cuda.stream(self.stream):
                if ev is not None:
                    self.stream.wait_event(ev)  # compute finished with this slot
                if data.device.type != "cuda":  # host or disk tier: one copy of the compressed bytes
                    stage = self.staging[n % len(self.staging)][: data.numel()]
                    stage.copy_(data, non_blocking=True)
                    self.stats.bytes_copied += data.numel()
                    data = stage
                self._fill(slot, i, self._views(i, data, verify=False))
            self.stream.synchronize()  # slot complete, read buffer free again
        else:
            self._fill(slot, i, self._views(i, data, verify=item.get("verify", False)))
        self.stats.decompress_s += time.perf_counter() - t0

    def _views(self, i: int, data: torch.Tensor, verify: bool) -> dict:
        """{name: stored form} of what streams for layer i: the whole layer, or its base (MoE layers).

        The views of a resident layer (bytes held in memory for good, checked at load) are made once:
        building them at every use is Python work that competes with the compute thread."""
        src = self.sources[self.pos[i]]
        resident = src.tier != "disk" and data is src.data
        if resident and i in self._resident_views:
            return self._resident_views[i]
        views = self.ckpt.base_views(i, data) if src.base else self.ckpt.layer_views(i, data, verify=verify)
        if resident:  # verified when read (read_base) or loaded
            self._resident_views[i] = views
        return views

    def _fill(self, slot: dict, i: int, views: dict) -> None:
        plen = len(self.prefix[i])
        for name, stored in views.items():
            rel = name[plen:]
            if isinstance(stored, list):  # an expert parameter of a layer streamed whole: one [E, ...] slot
                shape = (len(stored), *stored[0].shape)
                out = slot[rel][: math.prod(shape)].view(shape)
                whole_experts(stored, out=out, decompress=self.decompress, threads=self.decompress_threads)
            elif isinstance(stored, BitmapTensor):
                out = slot[rel][: stored.shape[0] * stored.shape[1]].view(stored.shape)
                self.decompress(stored, out=out, threads=self.decompress_threads)
            else:
                out = slot[rel][: stored.numel()].view(stored.shape)
                out.copy_(stored, non_blocking=self.cuda)

    # -- compute side
    def acquire(self, layer: int) -> dict[str, torch.Tensor]:
        """wait(n): the dense tensors of `layer` (views into its slot), once decompressed."""
        if self.direct:
            views = self._direct_views.get(layer)
            if views is None:
                src = self.sources[self.pos[layer]]
                plen = len(self.prefix[layer])
                views = {name[plen:]: v for name, v in self._views(layer, src.data, verify=False).items()}
                self._direct_views[layer] = views
            self.stats.uses += 1
            return views
        t0 = time.perf_counter()
        self.start()
        with self.cv:
            restart = self.broken or self.layer_of(self.cur) != layer
        if restart:
            self._restart(layer)
        with self.cv:
            n = self.cur
            while self.decomp_n <= n:
                if self.error is not None:
                    err, self.error = self.error, None
                    self.stop = self.broken = True
                    self.cv.notify_all()
                    raise err
                self.cv.wait(0.1)
            if self.done_layer.pop(n) != layer:  # cannot happen: sequence numbers map to layers
                raise RuntimeError(f"streaming pipeline out of step: layer {layer} wanted at step {n}")
            views = self.views_ready.pop(n, None)
        dt = time.perf_counter() - t0
        self.stats.wait_s += dt
        self.stats.per_layer_wait[layer] = self.stats.per_layer_wait.get(layer, 0.0) + dt
        self.stats.uses += 1
        if views is not None:
            plen = len(self.prefix[layer])
            return {name[plen:]: v for name, v in views.items()}
        return self._slot_views(n % self.K, layer)

    def _slot_views(self, k: int, i: int) -> dict[str, torch.Tensor]:
        plen = len(self.prefix[i])
        out = {}
        for name in (self.ckpt.base_params(i) if self.sources[self.pos[i]].base else self.ckpt.layer_tensors(i)):
            e = self.ckpt.tensors[name]
            numel = 1
            for s in e.shape:
                numel *= s
            out[name[plen:]] = self.slots[k][name[plen:]][:numel].view(e.shape)
        return out

    def release(self, layer: int) -> None:
        """release(n): compute is done with the slot of `layer`."""
        if self.direct:
            return
        with self.cv:
            n = self.cur
            if self.layer_of(n) != layer:
                return  # out of order: the next acquire restarts
            if self.cuda:
                ev = torch.cuda.Event()
                ev.record(torch.cuda.current_stream(self.device))
                self.slot_free_event[n % self.K] = ev
            self.cur = n + 1
            self.released_n = n + 1
            k = self.disk_of.pop(n, None)
            if k is not None:
                self.disk_released = k + 1
            self.cv.notify_all()

    def _restart(self, layer: int) -> None:
        self.shutdown()
        self.stats.restarts += 1
        with self.cv:
            self._reset(base=self.pos[layer])
        self.start()
