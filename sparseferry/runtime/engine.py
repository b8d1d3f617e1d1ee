"""`sparseferry.load`: a HuggingFace causal LM whose decoder layers stream from a sparseferry checkpoint.

The model is the transformers model itself, built from the checkpoint's config on the meta device
(any causal LM whose decoder layers form a ModuleList, no per-model code). Non-layer weights and the
layers the plan keeps dense are materialized on the device; every other layer keeps meta parameters
and, around its forward, a pre-hook installs dense views from the pipeline's slot (`acquire`) and a
post-hook hands the slot back (`release`). So `model.generate`, `model(input_ids)`, sampling,
batching and the KV cache are exactly transformers'.
"""
from __future__ import annotations

import atexit
import dataclasses
import resource
import time
import types
import warnings
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import SparseferryError
from ..format import QUANT_FORMATS, BitmapTensor
from ..hf import config_from_dict, model_info
from ..store import Checkpoint, CheckpointError, open_checkpoint
from .budget import format_bytes, parse_budget
from .embedding import RowReader, embed_on_demand
from .hf_compat import check_local_path, from_pretrained_options
from .expert_cache import ExpertCache, expert_keys
from .experts import ExpertsRuntime
from . import decode_layer, norms, placeholders
from .pipeline import LayerSource, Pipeline
from .plan import Plan, make_plan
from .whole_experts import whole_experts


class RuntimeLoadError(SparseferryError):
    """The checkpoint cannot be loaded on this device with these settings."""


def _device(device) -> torch.device:
    d = torch.device(device)
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeLoadError("device 'cuda' requested but CUDA is not available (torch.cuda.is_available() is False); use device='cpu'")
        if d.index is None:
            d = torch.device("cuda", torch.cuda.current_device())
    elif d.type != "cpu":
        raise RuntimeLoadError(f"device {device!r} is not supported (use 'cpu' or 'cuda')")
    return d


def _set_param(model: nn.Module, name: str, value: torch.Tensor | nn.Parameter) -> None:
    mod_name, _, leaf = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    if leaf in mod._buffers:  # a persistent buffer stored in the checkpoint (e.g. a router's score correction)
        mod._buffers[leaf] = value.detach() if isinstance(value, nn.Parameter) else value
        return
    mod._parameters[leaf] = value if isinstance(value, nn.Parameter) else nn.Parameter(value, requires_grad=False)


def _bitmap_forward(self: nn.Module, *args, **kwargs):
    """forward of a module whose weight the pipeline handed over compressed (CPU).

    nn.Linear at small batch: the fused kernel multiplies from the bitmap. Otherwise the weight is
    decompressed into the engine's scratch buffer (one matrix, reused by every module in turn) and
    the module's own forward runs on it.
    """
    bt = self._sf_bitmap
    if bt is None:
        return self._sf_forward(*args, **kwargs)
    from ..kernels import MATVEC_MAX_BATCH, decompress, sparse_matmul

    x = args[0] if args else next(iter(kwargs.values()))
    if type(self) is nn.Linear and x.numel() // x.shape[-1] <= MATVEC_MAX_BATCH:
        return sparse_matmul(x, bt, self.bias)
    rows, cols = bt.shape
    w = self._sf_scratch[: rows * cols * bt.dtype.itemsize].view(bt.dtype).view(rows, cols)
    self._parameters["weight"] = nn.Parameter(decompress(bt, out=w), requires_grad=False)
    return self._sf_forward(*args, **kwargs)  # an nn.Linear's: _dense_forward (kernels.linear_wide beyond a few rows)


def _dense_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """forward of a CPU nn.Linear holding a plain dense weight: at small batch the native dense
    matvec (`kernels.dense_matmul`, one pass over the weight at memory bandwidth), else torch's."""
    from ..kernels import dense_matmul

    return dense_matmul(x, self.weight, self.bias)


def _head_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """The output head on 2-D rows. transformers gives it `hidden[:, -k:, :]`, a 3-D strided slice;
    torch's matmul then cannot fold the batch into one GEMM and copies the (transposed) weight once
    per sequence: B x 125 MiB for a 32000 x 2048 bf16 head, beyond any budget. As [B*k, H] rows
    (a copy of B*k rows) it is one GEMM reading the weight in place; same result. On the CPU, a few
    rows go through the native dense matvec (`kernels.dense_matmul`)."""
    from ..kernels import MATVEC_MAX_BATCH, dense_matmul, sparse_matmul

    rows = x.reshape(-1, x.shape[-1])
    bt = self.__dict__.get("_sf_head")
    if bt is not None:  # held compressed (an int8 / int4 head): the fused kernel, a few rows at a time
        n = max(rows.shape[0], 1)
        parts = [sparse_matmul(rows[i : i + MATVEC_MAX_BATCH], bt, self.bias) for i in range(0, n, MATVEC_MAX_BATCH)]
        y = parts[0] if len(parts) == 1 else torch.cat(parts)
    else:
        y = dense_matmul(rows, self.weight, self.bias)  # torch's linear off the CPU or beyond a few rows
    return y.view(*x.shape[:-1], y.shape[-1])


def _compressed_head_name(model: nn.Module, ckpt: Checkpoint, info, dev: torch.device, resident_form: str) -> str | None:
    """The name of the output head's weight if `load` holds it in its stored form: on the CPU with the
    fused kernel, when the checkpoint stores it with quantized values (`convert --encode-lm-head
    --values int8|int4`: 9 or 5 bits a weight against 16, as llama.cpp's Q8_0 / Q4_0 files hold
    their output matrix) and layers stay compressed. Its multiply then reads those bytes, not a
    dense bf16 copy. A bitmap head of float values (17 bits a weight when unpruned) is decoded."""
    head = model.get_output_embeddings()
    if dev.type != "cpu" or resident_form != "compressed" or type(head) is not nn.Linear:
        return None
    for name in info.top_linear_weights:
        e = ckpt.tensors.get(name)
        mod_name = name.rpartition(".")[0]
        if (e is not None and e.encoding != "dense" and e.values in QUANT_FORMATS and name.endswith(".weight")
                and model.get_submodule(mod_name) is head):
            return name
    return None


def _owned(bt: BitmapTensor) -> BitmapTensor:
    """bt with every part copied out of the file mapping (the checkpoint's mappings are dropped)."""
    return dataclasses.replace(bt, **{f.name: getattr(bt, f.name).clone() for f in dataclasses.fields(bt)
                                      if isinstance(getattr(bt, f.name), torch.Tensor)})


def _peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM: unlike ru_maxrss, not inherited across exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


@dataclass
class PassRecord:
    batch: int
    tokens: int  # new positions computed in this forward pass
    seconds: float
    bytes_read: int
    wait_s: float
    decompress_s: float
    read_s: float = 0.0  # time with a disk read in flight (layers and experts)
    experts: dict | None = None  # MoE: this pass's expert counters (ExpertStats fields)


_LIVE: "weakref.WeakSet[StreamingEngine]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    """Stop every pipeline before the interpreter tears down: a daemon thread still inside torch
    during finalisation can abort the process."""
    for engine in list(_LIVE):
        engine.close()


class StreamingEngine:
    """Owns the plan, the pipeline and the hooks of one loaded model; `model.sparseferry` points here."""

    def __init__(self, ckpt: Checkpoint, model: nn.Module, plan: Plan, device: torch.device, pipeline: Pipeline | None,
                 layers: nn.ModuleList, rss_before: int, experts=None, pinned: frozenset[str] = frozenset()):
        self.ckpt, self.model, self.plan, self.device = ckpt, model, plan, device
        self.pipeline = pipeline
        self.experts = experts  # runtime/experts.py ExpertsRuntime, for MoE layers
        self.pinned = pinned  # layer tensors held on their own (routers): never replaced by streamed views
        self.layers = layers
        self.rss_before = rss_before
        self.passes: list[PassRecord] = []
        self.compute_s = 0.0
        self._pass_t0 = None
        self._handles = []
        _LIVE.add(self)
        self.scratch = None
        self.closed = False
        if device.type == "cpu":
            self._patch_dense_linears()
            norms.patch(model)  # RMSNorm in one native call (runtime/norms.py)
            decode_layer.patch(model, layers)  # a decode step of a Llama-family layer in native calls
        if self.pipeline is not None and self.pipeline.mode == "views":
            self._patch_bitmap_modules()
        if self.experts is not None:
            self.experts.scratch = self.scratch
        placeholders.install(self)
        self._install_hooks()

    def _patch_dense_linears(self) -> None:
        """CPU: every plain nn.Linear multiplies a few rows with the native dense matvec (the head has its own)."""
        head = self.model.get_output_embeddings()
        for mod in self.model.modules():
            if type(mod) is nn.Linear and mod is not head and "forward" not in mod.__dict__:
                mod.forward = types.MethodType(_dense_forward, mod)

    def _patch_bitmap_modules(self) -> None:
        """CPU: modules whose weight is bitmap-encoded in a streamed layer compute from it directly."""
        from ..io import aligned_empty

        self.scratch = aligned_empty(self.plan.scratch_bytes) if self.plan.scratch_bytes else None
        for i in self.plan.streamed:
            plen = len(f"{self.ckpt.layers_prefix}.{i}.")
            base = self.experts is not None and i in self.experts.per_expert  # experts: runtime/experts.py
            for name in self.ckpt.base_params(i) if base else self.ckpt.layer_tensors(i):
                if self.ckpt.tensors[name].encoding in ("dense", "experts"):  # whole experts: whole_experts.py
                    continue
                mod_name, _, leaf = name[plen:].rpartition(".")
                mod = self.layers[i].get_submodule(mod_name)
                if leaf != "weight":
                    raise CheckpointError(f"{self.ckpt.path}: {name} is bitmap-encoded but is not a module's weight")
                if "_sf_forward" not in mod.__dict__:
                    mod._sf_forward = mod.forward
                    mod._sf_bitmap = None
                    mod._sf_scratch = self.scratch
                    mod.forward = types.MethodType(_bitmap_forward, mod)

    # -- hooks: the schedule's compute side
    def _install_hooks(self) -> None:
        streamed = set(self.plan.streamed)
        for i, layer in enumerate(self.layers):
            if i in streamed:
                self._handles.append(layer.register_forward_pre_hook(self._make_pre(i)))
                self._handles.append(layer.register_forward_hook(self._make_post(i)))
        head = self.model.get_output_embeddings()
        if type(head) is nn.Linear and "forward" not in head.__dict__:
            head.forward = types.MethodType(_head_forward, head)
        self._handles.append(self.model.register_forward_pre_hook(self._pass_start, with_kwargs=True))
        self._handles.append(self.model.register_forward_hook(self._pass_end, with_kwargs=True))

    def _make_pre(self, i: int):
        layer = self.layers[i]
        prefix = f"{self.ckpt.layers_prefix}.{i}."
        plen = len(f"{self.ckpt.layers_prefix}.{i}.")
        pinned = {n[plen:] for n in self.pinned if self.ckpt.tensors[n].layer == i}

        owners: dict[str, nn.Module] = {}  # rel name -> the module holding it, looked up once

        def pre(module, args):
            for rel, t in self.pipeline.acquire(i).items():  # wait(n)
                if rel in pinned:
                    continue
                if isinstance(t, BitmapTensor):  # views mode: the module computes from the bitmap
                    mod = owners.get(rel)
                    if mod is None:
                        mod = owners[rel] = layer.get_submodule(rel.rpartition(".")[0])
                    mod.__dict__["_sf_bitmap"] = t  # a plain attribute: nn.Module's __setattr__ is slow
                elif isinstance(t, list):  # views mode, a layer streamed whole: every expert decoded
                    _set_param(layer, rel, whole_experts(t, self.ckpt.tensors[f"{prefix}{rel}"].shape))
                else:
                    _set_param(layer, rel, t)
            self._layer_t0 = time.perf_counter()

        return pre

    def _make_post(self, i: int):
        def post(module, args, output):
            self.compute_s += time.perf_counter() - self._layer_t0
            placeholders.restore(self, i)  # no parameter keeps pointing at a buffer the next layer reuses
            self.pipeline.release(i)  # release(n): the slot may be refilled

        return post

    def _pass_start(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        shape = tuple(ids.shape[:2]) if ids is not None else (1, 1)
        ps = self.pipeline.stats if self.pipeline else None
        self._pass_t0 = (time.perf_counter(), shape, self._bytes_read(), self._wait_s(),
                         ps.decompress_s if ps else 0.0, self._read_s(),
                         self.experts.cache.stats.snapshot() if self.experts is not None else None)

    def _pass_end(self, module, args, kwargs, output):
        if self._pass_t0 is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t0, shape, b0, w0, d0, r0, e0 = self._pass_t0
        ps = self.pipeline.stats if self.pipeline else None
        ex = None
        if e0 is not None:
            now = vars(self.experts.cache.stats)
            ex = {k: now[k] - v for k, v in vars(e0).items()}
        self.passes.append(PassRecord(batch=shape[0], tokens=shape[1], seconds=time.perf_counter() - t0,
                                      bytes_read=self._bytes_read() - b0, wait_s=self._wait_s() - w0,
                                      decompress_s=(ps.decompress_s - d0) if ps else 0.0,
                                      read_s=self._read_s() - r0, experts=ex))
        self._pass_t0 = None

    def _bytes_read(self) -> int:
        """Bytes read from disk so far (streamed layers, and experts)."""
        n = self.pipeline.stats.bytes_read if self.pipeline else 0
        return n + (self.experts.cache.stats.bytes_read if self.experts is not None else 0)

    def _read_s(self) -> float:
        """Seconds with a disk read in flight so far (the layer pipeline's and the expert reader's)."""
        r = self.pipeline.stats.read_s if self.pipeline else 0.0
        return r + (self.experts.cache.stats.read_s if self.experts is not None else 0.0)

    def _wait_s(self) -> float:
        w = self.pipeline.stats.wait_s if self.pipeline else 0.0
        return w + (self.experts.cache.stats.wait_s if self.experts is not None else 0.0)

    # -- reporting
    def reset_stats(self) -> None:
        self.passes.clear()
        self.compute_s = 0.0
        if self.experts is not None:
            from .expert_cache import ExpertStats

            self.experts.cache.stats = ExpertStats()

    def summary(self) -> dict:
        """Prefill / decode timings, bytes read per token, time split and memory, over the recorded passes."""
        prefill = [p for p in self.passes if p.tokens > 1]
        decode = [p for p in self.passes if p.tokens == 1]
        dsec = sum(p.seconds for p in decode)
        dtok = sum(p.batch for p in decode)
        total = sum(p.seconds for p in self.passes)
        wait = sum(p.wait_s for p in self.passes)
        out = {
            "plan": {t: self.plan.count(t) for t in ("dense", "compressed", "host", "disk")},
            "budget_bytes": self.plan.budget,
            "device_weight_bytes": self.plan.device_bytes,
            "prefill_s": sum(p.seconds for p in prefill),
            "prefill_tokens": sum(p.tokens * p.batch for p in prefill),
            "decode_steps": len(decode),
            "decode_tokens": dtok,
            "decode_s_per_step": dsec / len(decode) if decode else None,
            "decode_tokens_per_s": dtok / dsec if dsec else None,
            "bytes_read_per_token": (sum(p.bytes_read for p in decode) / len(decode)) if decode else None,
            "bytes_read": sum(p.bytes_read for p in self.passes),
            "io_wait_s": wait,
            "decompress_s": sum(p.decompress_s for p in self.passes),
            "compute_s": max(total - wait, 0.0),
            "io_wait_share": wait / total if total else 0.0,
            **self._read_path(decode),
            "peak_rss_bytes": _peak_rss_bytes(),
            "rss_before_load_bytes": self.rss_before,
        }
        if self.device.type == "cuda":
            out["peak_device_bytes"] = torch.cuda.max_memory_allocated(self.device)
        if self.experts is not None:
            out["experts"] = self._experts_summary(decode)
        return out

    @staticmethod
    def _read_path(decode: list[PassRecord]) -> dict:
        """Decode's read path: the achieved read bandwidth (bytes over the time a read was in flight),
        read and compute time per step (compute: the pass minus its waits for bytes), and `overlap`,
        the step time over max(read, compute): 1.0 when reads hide entirely behind compute or the
        other way round, 2.0 when they run one after the other. None where nothing was read."""
        n = len(decode)
        read_s = sum(p.read_s for p in decode)
        nbytes = sum(p.bytes_read for p in decode)
        if not n or not nbytes or read_s <= 0:
            return {"read_gbps": None, "read_s_per_token": None, "compute_s_per_token": None, "overlap": None}
        step = sum(p.seconds for p in decode) / n
        read, compute = read_s / n, sum(max(p.seconds - p.wait_s, 0.0) for p in decode) / n
        return {"read_gbps": nbytes / read_s / 1e9, "read_s_per_token": read, "compute_s_per_token": compute,
                "overlap": step / max(read, compute)}

    def _experts_summary(self, decode: list[PassRecord]) -> dict:
        """Expert reads at decode time: hit rate, predicted vs missed reads, bytes against what routing needs."""
        tot = {}
        for p in decode:
            for k, v in (p.experts or {}).items():
                tot[k] = tot.get(k, 0) + v
        n = len(decode)
        uses = tot.get("uses", 0)
        base = sum(p.bytes_read for p in decode) - tot.get("bytes_read", 0)  # streamed layer bases (and dense layers)
        per = lambda k: tot.get(k, 0) / n if n else None  # noqa: E731
        need = (tot.get("routed_bytes", 0) + base) / n if n else None
        return {
            "experts_total": self.plan.num_experts,
            "cache_slots": self.plan.expert_slots,
            "cache_bytes": self.plan.expert_slots * self.plan.expert_slot_bytes,
            "chosen_per_token": per("uses"),
            "hit_rate": tot.get("hits", 0) / uses if uses else None,
            "predicted_reads": tot.get("predicted", 0),
            "missed_reads": tot.get("missed", 0),
            "wasted_reads": tot.get("wasted", 0),
            "expert_bytes_read_per_token": per("bytes_read"),
            "routed_expert_bytes_per_token": per("routed_bytes"),
            "needed_bytes_per_token": need,  # the chosen experts plus the streamed bases, with no cache
        }

    def close(self) -> None:
        """Stop the pipeline and free its buffers; any later forward raises ModelClosedError."""
        if self.closed:
            return
        self.closed = True
        rows = getattr(self.model.get_input_embeddings(), "_sf_rows", None)
        if rows is not None:
            rows.close()
        for h in self._handles:
            h.remove()
        self._handles = []
        if self.pipeline is not None:
            self.pipeline.close()
        if self.experts is not None:
            self.experts.close()
        for i in self.plan.streamed:
            placeholders.restore(self, i)
        self._handles.append(self.model.register_forward_pre_hook(placeholders.refuse_when_closed(self), with_kwargs=True))


def load(path, device="cpu", memory_budget=None, storage: str = "disk", *, direct_io: bool = True,
         verify: bool = True, nslots: int = 2, nreadbufs: int = 2, slots: bool | None = None,
         embeddings_on_demand: bool | None = None, resident_form: str | None = None,
         decompress_threads: int | None = None,
         attn_implementation: str | None = None, **from_pretrained_kwargs) -> nn.Module:
    """Load a sparseferry checkpoint as a HuggingFace causal LM that streams what does not fit.

    Args:
        path: a folder written by `sparseferry convert` or `sparseferry prune`.
        device: "cpu" or "cuda" (or "cuda:N").
        memory_budget: bytes or a size string ("4GiB", "512MB") or a share of the stored weights ("30%");
            bounds the weights the engine holds on the device: resident layers, embeddings/head, and the
            streaming buffers. None: everything resident (see resident_form).
        storage: where streamed layers live: "disk" (read from the files at every use, bypassing the page
            cache unless direct_io=False) or "host" (compressed in host memory; pinned on CUDA).
        verify: check each layer's checksum every time it is read from disk.
        nslots / nreadbufs: dense slots and read buffers of the streaming pipeline (more = deeper prefetch).
        slots: decompress whole streamed layers into dense slots ahead of compute (default: on CUDA).
            Otherwise (default on CPU) layers compute from the compressed bytes where they lie: fused
            sparse matmul for small batches, one matrix at a time through a scratch buffer for large.
        resident_form: "dense" or "compressed": the form of the decoder layers kept in memory. Default:
            "compressed" on a CPU with the native fused kernel (smaller, and faster to multiply at
            decode time than torch's dense bf16 matvec; large batches decompress one matrix at a
            time), "dense" elsewhere. With memory_budget=None every layer is resident in this form.
        embeddings_on_demand: read input-embedding rows from the file per step instead of holding the
            table (default: when there is a budget and the table is not tied to the output head).
        **from_pretrained_kwargs: the `from_pretrained` keywords that mean something here (dtype /
            torch_dtype checked against the stored dtype, device_map, max_memory, low_cpu_mem_usage, ...);
            the others are refused by name with the sparseferry equivalent (see runtime/hf_compat.py).
    Returns:
        the transformers model; `model.sparseferry` is its StreamingEngine (plan, summary(), close()).
    Raises:
        CheckpointError (not a checkpoint, corrupt), BudgetError (unparseable, below the minimum),
        RuntimeLoadError (device unavailable, architecture unknown).
    """
    check_local_path(path)
    if from_pretrained_kwargs:
        opts = from_pretrained_options(from_pretrained_kwargs, device=device, memory_budget=memory_budget,
                                       storage=storage, stored_dtype=lambda: _checkpoint_dtype(open_checkpoint(path)))
        device, memory_budget, storage = opts["device"], opts["memory_budget"], opts["storage"]
        attn_implementation = opts.get("attn_implementation", attn_implementation)
    dev = _device(device)
    rss_before = _rss_bytes()
    ckpt = open_checkpoint(path)
    config = config_from_dict(ckpt.config)
    if attn_implementation:
        config._attn_implementation = attn_implementation
    dtype = _checkpoint_dtype(ckpt)
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with init_empty_weights(include_buffers=False):  # parameters on meta, buffers (rotary) real
            try:
                model = AutoModelForCausalLM.from_config(config, dtype=dtype)
            except ValueError as e:
                raise RuntimeLoadError(f"{ckpt.path}: transformers cannot build {config.model_type!r}: {e}") from None
    info = model_info(model)
    if info.layers_prefix != ckpt.layers_prefix or info.num_layers != ckpt.num_layers:
        raise CheckpointError(f"{ckpt.path}: checkpoint has {ckpt.num_layers} layers under {ckpt.layers_prefix!r}, "
                              f"the model built from its config has {info.num_layers} under {info.layers_prefix!r}")
    missing = [n for n in info.param_names if n not in ckpt.tensors and n not in ckpt.tied and n not in info.tied]
    if missing:
        raise CheckpointError(f"{ckpt.path}: no weights for {', '.join(missing[:5])}")
    _check_against_model(ckpt, model, info)
    _match_stored_dtypes(model, ckpt)
    if dev.type == "cpu" and not attn_implementation and model.config._attn_implementation == "sdpa":
        from . import attention

        model.set_attn_implementation(attention.register())  # decode steps with packed GQA heads
    budget = parse_budget(memory_budget, ckpt.stored_bytes())
    lazy_emb = _on_demand_embedding(model, info, ckpt) if (budget is not None if embeddings_on_demand is None
                                                             else embeddings_on_demand) else None
    use_slots = dev.type == "cuda" if slots is None else slots
    if dev.type == "cuda" and not use_slots:
        raise RuntimeLoadError("slots=False is only supported on the CPU")
    if resident_form is None:
        resident_form = "dense" if use_slots or not _fused_kernel_available() else "compressed"
    if resident_form not in ("dense", "compressed"):
        raise RuntimeLoadError(f"resident_form must be 'dense' or 'compressed', got {resident_form!r}")
    layers = model.get_submodule(info.layers_prefix)
    moe_layers = [i for i in range(ckpt.num_layers) if ckpt.num_experts(i)]
    experts = ExpertsRuntime(ckpt, layers, moe_layers) if moe_layers else None
    if experts is not None and not experts.moe_layers:
        experts = None  # no fused-experts module: MoE layers stream whole
    per_expert = experts.per_expert if experts else frozenset()
    head_bitmap = _compressed_head_name(model, ckpt, info, dev, resident_form)
    plan = make_plan(ckpt, budget, storage=storage, nslots=nslots, nreadbufs=nreadbufs, slots=use_slots,
                     exclude=frozenset([lazy_emb] if lazy_emb else []), prefer_dense=resident_form == "dense",
                     compressed=frozenset([head_bitmap] if head_bitmap else []),
                     pinned=experts.pinned if experts else frozenset(), per_expert=per_expert)
    if experts is not None and not plan.streamed:  # everything dense: transformers' own experts forward
        experts = None

    # 1. non-layer weights and dense-resident layers: decoded once, on the device
    for name in ckpt.non_layer_tensors():
        if name == head_bitmap:  # the fused kernel multiplies from the stored form (_head_forward)
            head = model.get_output_embeddings()
            head._sf_head = _owned(ckpt.stored(name, verify=verify))
            e = ckpt.tensors[name]
            _set_param(model, name, placeholders.held_compressed(e.shape, e.dtype, dev, name, ckpt.path))
        elif name != lazy_emb:
            _set_param(model, name, ckpt.load(name, verify=verify).to(dev))
    if lazy_emb:
        embed_on_demand(model.get_input_embeddings(), RowReader(ckpt, lazy_emb, verify=verify), dev)
    for i, tier in enumerate(plan.tiers):
        if tier == "dense":
            for name in ckpt.layer_tensors(i):
                _set_param(model, name, ckpt.load(name, verify=verify).to(dev))
    for name in experts.pinned if experts is not None else ():  # routers, resident for prediction
        _set_param(model, name, ckpt.load(name, verify=verify).to(dev))
    for target, source in {**info.tied, **ckpt.tied}.items():
        if target in ckpt.tensors:
            continue
        src_mod, _, src_leaf = source.rpartition(".")
        _set_param(model, target, model.get_submodule(src_mod)._parameters[src_leaf])
    ckpt._mmaps.clear()  # drop the file mappings (they count in RSS once touched)
    for mod in model.modules():
        for bname, buf in list(mod._buffers.items()):
            if buf is not None and buf.device != dev and buf.device.type != "meta":
                mod._buffers[bname] = buf.to(dev)

    # 2. streamed layers: their sources and the pipeline
    pipeline = None
    if plan.streamed:
        sources, slot_shapes = [], {}
        for i in plan.streamed:
            base = i in per_expert  # only the base streams here; experts: the ExpertCache
            path_i, start, end = ckpt.base_range(i) if base else ckpt.layer_range(i)
            tier = plan.tiers[i]
            if tier == "disk":
                src = LayerSource(i, tier, reader=ckpt.open_reader(i, direct=direct_io), start=start, end=end, base=base)
            else:
                data = _read_resident(ckpt, i, dev if tier == "compressed" else torch.device("cpu"),
                                      pin=dev.type == "cuda" and tier == "host", base=base)
                src = LayerSource(i, tier, data=data, start=start, end=end, base=base)
            sources.append(src)
            plen = len(f"{ckpt.layers_prefix}.{i}.")
            for name in ckpt.base_params(i) if base else ckpt.layer_tensors(i):
                e = ckpt.tensors[name]
                numel = 1
                for s in e.shape:
                    numel *= s
                rel = name[plen:]
                prev = slot_shapes.get(rel, (0, e.dtype))[0]
                slot_shapes[rel] = (max(prev, numel), e.dtype)
        pipeline = Pipeline(ckpt, sources, dev, nslots=plan.nslots, nreadbufs=plan.nreadbufs, readbuf_bytes=plan.readbuf_bytes,
                            slot_shapes=slot_shapes, verify=verify, decompress_threads=decompress_threads)
    if experts is not None:
        experts.install(_expert_cache(ckpt, plan, dev, storage, direct_io, per_expert))
    model.eval()
    engine = StreamingEngine(ckpt, model, plan, dev, pipeline, layers, rss_before, experts=experts,
                             pinned=experts.pinned if experts else frozenset())
    model.sparseferry = engine
    return model


def _match_stored_dtypes(model: nn.Module, ckpt: Checkpoint) -> None:
    """Give every parameter still on meta the dtype it is stored in.

    A model built with one dtype can hold parameters that its checkpoint stores in another (an fp32
    router in a bf16 model, or the reverse). A streamed parameter stays on meta between uses, and
    model code that looks at `weight.dtype` to cast its input (HunYuan-MoE's router does) must see
    the dtype the weights will really have when it computes, not the construction dtype.
    """
    for name, p in list(model.named_parameters()):
        e = ckpt.tensors.get(name)
        if e is not None and p.device.type == "meta" and p.dtype != e.dtype:
            _set_param(model, name, torch.empty(p.shape, dtype=e.dtype, device="meta"))


def _check_against_model(ckpt: Checkpoint, model: nn.Module, info) -> None:
    """Every stored tensor is a parameter of the model built from the config, of its shape, and
    (stored densely) of its dtype: nothing forged reaches a module's forward."""
    params = dict(model.named_parameters(remove_duplicate=False))
    params.update(model.named_buffers(remove_duplicate=False))  # persistent buffers are stored too
    for name, e in ckpt.tensors.items():
        p = params.get(name)
        where = f"{ckpt.path / e.file}: tensor {name}"
        if p is None:
            raise CheckpointError(f"{where} is not a parameter of the {type(model).__name__} its config describes")
        if tuple(p.shape) != e.shape:
            raise CheckpointError(f"{where} is {list(e.shape)}, the model's parameter is {list(p.shape)}")
        if e.encoding == "dense" and p.is_floating_point() != e.dtype.is_floating_point:
            raise CheckpointError(f"{where} is {e.dtype}, the model's parameter is {p.dtype}")
        if e.encoding == "dense" and p.is_floating_point() and e.dtype != p.dtype and e.dtype.itemsize == p.dtype.itemsize:
            raise CheckpointError(f"{where} is stored as {e.dtype} in a {p.dtype} model (relabelled bytes?)")
    for target, source in ckpt.tied.items():
        if target in ckpt.tensors:
            continue
        if not isinstance(source, str) or source not in ckpt.tensors or target not in params \
                or tuple(params[target].shape) != ckpt.tensors[source].shape:
            raise CheckpointError(f"{ckpt.path}: manifest ties {target} to {source!r}, which is not a stored tensor of "
                                  f"the same shape")


def _fused_kernel_available() -> bool:
    try:
        from ..kernels import kernel_path

        return kernel_path("cpu") != "torch"
    except Exception:  # noqa: BLE001 - no kernels at all: the reference path
        return False


def _on_demand_embedding(model: nn.Module, info, ckpt: Checkpoint) -> str | None:
    """Name of the input-embedding weight if it can be read by row (plain nn.Embedding, dense, untied)."""
    emb = model.get_input_embeddings()
    if type(emb) is not nn.Embedding:
        return None
    name = next((f"{n}.weight" for n, m in model.named_modules() if m is emb), None)
    tied = set(info.tied) | set(info.tied.values()) | set(ckpt.tied) | set(ckpt.tied.values())
    if name is None or name in tied or name not in ckpt.tensors or ckpt.tensors[name].encoding != "dense":
        return None
    return name


def _expert_cache(ckpt: Checkpoint, plan: Plan, dev: torch.device, storage: str, direct_io: bool,
                  plan_layers: frozenset[int]) -> ExpertCache:
    """The pool of expert slots the plan sized, filled before the first token (as many experts as fit)."""
    from tqdm import tqdm

    from ..io import aligned_empty

    host = None
    keys = expert_keys(ckpt, sorted(plan_layers))
    if storage == "host":  # every expert in host memory, verified once (pinned for copies to CUDA)
        buf = aligned_empty(plan.expert_slot_bytes)
        host = {}
        for i in sorted({i for i, _ in keys}):
            with ckpt.open_reader(i, direct=True) as r:
                host[i] = []
                for e in range(ckpt.num_experts(i)):
                    data = ckpt.read_expert(i, e, buf, reader=r)
                    t = torch.empty(data.numel(), dtype=torch.uint8, pin_memory=dev.type == "cuda")
                    host[i].append(t.copy_(data))
    cache = ExpertCache(ckpt, dev, plan.expert_slots, plan.expert_slot_bytes, storage=storage, direct=direct_io,
                        host=host)
    n = min(cache.nslots, len(keys))
    with tqdm(total=n, desc="experts", unit="expert", disable=n < 64, leave=False) as bar:
        cache.preload(keys, progress=bar)
    return cache


def _read_resident(ckpt: Checkpoint, i: int, device: torch.device, pin: bool, base: bool = False) -> torch.Tensor:
    """Layer i's bytes (its base for a layer with experts), verified, held in memory (device for the
    compressed tier, host for the host tier)."""
    from ..io import aligned_empty, buffer_size_for

    if base:
        path, start, end = ckpt.base_range(i)
        buf = aligned_empty(buffer_size_for(start, end))
        with ckpt.open_reader(i, direct=True) as r:
            data = ckpt.read_base(i, buf, reader=r)  # raises on a checksum mismatch
    else:
        path, start, end = ckpt.layer_range(i)
        buf = aligned_empty(buffer_size_for(start, end))
        with ckpt.open_reader(i, direct=True) as r:
            data = r.read_range(start, end, buf)
        ckpt.layer_views(i, data, verify=True)  # raises on a checksum mismatch
    out = torch.empty(end - start, dtype=torch.uint8, device=device, pin_memory=pin and device.type == "cpu")
    out.copy_(data)
    return out


def _checkpoint_dtype(ckpt: Checkpoint) -> torch.dtype:
    counts: dict[torch.dtype, int] = {}
    for t in ckpt.tensors.values():
        if t.dtype.is_floating_point:
            counts[t.dtype] = counts.get(t.dtype, 0) + t.dense_bytes
    return max(counts, key=counts.get) if counts else torch.float32


def load_tokenizer(path):
    """The tokenizer saved in a checkpoint (or any HF) folder."""
    from transformers import AutoTokenizer

    check_local_path(path)
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: no usable tokenizer ({e})") from None


__all__ = ["load", "load_tokenizer", "StreamingEngine", "RuntimeLoadError", "format_bytes"]
