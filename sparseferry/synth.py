"""`sparseferry synth`: a synthetic HuggingFace model of a requested size, written tensor by tensor.

Anyone can benchmark their own machine without downloading a model: `synth(out, params="1B",
sparsity=0.5)` writes an ordinary HuggingFace folder (config.json, generation_config.json, safetensors
shards with an index, a byte-level tokenizer) holding random weights of a plausible shape:

  * the shape comes from a ladder of real decoder shapes (1B is TinyLlama-1.1B: hidden 2048, MLP 5632,
    22 layers, 32 heads, 4 KV heads, vocab 32000); the nearest rung is kept as is when it is within
    12.5% of the request, else its depth is refitted to the requested count;
  * weights are normal with std 0.02 (norm weights 1, biases 0), each tensor drawn from its own
    generator seeded by (seed, tensor name): the same seed gives the same weights, whatever the
    sparsity, so a 50%-pruned folder is exactly the magnitude-pruned copy of the unpruned one;
  * every linear weight inside the decoder layers (lm_head and embeddings are kept dense) has exactly
    round(sparsity * numel) zeros, those of smallest magnitude; so has every expert matrix;
  * mixtures of experts ("mixtral": 8 experts, top-2; "qwen3_moe": 128 experts, top-8, or as asked)
    are written as published checkpoints store them, one tensor per expert matrix under the names
    transformers' save_pretrained gives them (its conversion mapping reversed, e.g. Mixtral's
    `block_sparse_moe.experts.{e}.w1.weight`), so that reading them exercises the merge into fused
    experts that loading applies; the routers are random, so routing is nearly uniform;
  * the safetensors header of a shard is written first (shapes are known from the config), then each
    tensor's bytes as it is generated: one tensor in memory at a time, never the model.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import shutil
import struct
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .errors import SparseferryError

MARKER = "synth.json"  # written last: its presence means the folder is complete (and records how it was made)
STD = 0.02  # std of the random linear and embedding weights (that of trained 1B-7B models' init)
TOLERANCE = 0.125  # a ladder shape within this relative distance of the request is used unchanged
SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
_DTYPES = {"bfloat16": (torch.bfloat16, "BF16"), "float16": (torch.float16, "F16"), "float32": (torch.float32, "F32")}


class SynthError(SparseferryError):
    """A synthetic model that cannot be made as asked."""


@dataclass(frozen=True)
class Shape:
    """The size of a decoder-only transformer (gated-MLP convention: `intermediate` ~ 2.75 x hidden).

    A mixture of experts has `experts` > 0 routed experts per layer, `top_k` of them chosen per token,
    each a gated MLP of `intermediate` (then the size of one expert); `head_dim` 0 is hidden / heads.
    """

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int = 32000
    experts: int = 0
    top_k: int = 0
    head_dim: int = 0


_OPTIONAL = ("experts", "top_k", "head_dim")  # Shape fields left out of records while 0 (dense records unchanged)


def shape_record(shape: Shape) -> dict:
    """The Shape as recorded in synth.json: the optional fields only when set."""
    return {k: v for k, v in asdict(shape).items() if k not in _OPTIONAL or v}


# Real shapes, smallest first; vocab 32000 (Llama-2 tokenizer size) throughout.
LADDER = (
    Shape(128, 352, 4, 4, 2),  # toy
    Shape(256, 704, 6, 4, 2),  # toy
    Shape(512, 1408, 8, 8, 2),
    Shape(768, 2048, 12, 12, 4),  # ~125M
    Shape(1024, 2816, 16, 16, 4),  # ~250M
    Shape(2048, 5632, 22, 32, 4),  # TinyLlama-1.1B
    Shape(3072, 8192, 28, 24, 8),  # Llama-3.2-3B body
    Shape(4096, 11008, 32, 32, 32),  # Llama-2-7B
    Shape(5120, 13824, 40, 40, 40),  # Llama-2-13B
    Shape(8192, 28672, 80, 64, 8),  # Llama-2-70B
)


# Mixtral-like: 8 experts, top-2, expert MLP 3.5 x hidden. The largest two are Mixtral-8x7B and 8x22B (vocab
# kept at 32000); the smaller ones are those proportions scaled down.
MIXTRAL_LADDER = (
    Shape(128, 448, 4, 4, 2, experts=8, top_k=2),  # toy
    Shape(256, 896, 6, 4, 2, experts=8, top_k=2),  # toy
    Shape(512, 1792, 8, 8, 2, experts=8, top_k=2),  # ~0.2B
    Shape(1024, 3584, 16, 16, 4, experts=8, top_k=2),  # ~1.5B
    Shape(2048, 7168, 16, 16, 8, experts=8, top_k=2),  # ~5.8B
    Shape(4096, 14336, 32, 32, 8, experts=8, top_k=2),  # Mixtral-8x7B
    Shape(6144, 16384, 56, 48, 8, experts=8, top_k=2),  # Mixtral-8x22B
)

# Qwen3-MoE-like: many small experts, top-8 (64 in the small rungs, 128 as in the real models). The largest
# two are Qwen3-30B-A3B and Qwen3-235B-A22B (head_dim 128; vocab kept at 32000).
QWEN3_MOE_LADDER = (
    Shape(128, 64, 4, 4, 2, experts=64, top_k=8),  # toy
    Shape(256, 128, 6, 4, 2, experts=64, top_k=8),  # toy
    Shape(512, 256, 8, 8, 2, experts=64, top_k=8),  # ~0.3B
    Shape(1024, 384, 16, 16, 4, experts=128, top_k=8),  # ~2.5B
    Shape(2048, 768, 48, 32, 4, experts=128, top_k=8, head_dim=128),  # Qwen3-30B-A3B
    Shape(4096, 1536, 94, 64, 4, experts=128, top_k=8, head_dim=128),  # Qwen3-235B-A22B
)


def _gated(s: Shape) -> dict:
    return dict(hidden_size=s.hidden, intermediate_size=s.intermediate, num_hidden_layers=s.layers,
                num_attention_heads=s.heads, num_key_value_heads=s.kv_heads)


def _head_dim(s: Shape) -> dict:
    return {"head_dim": s.head_dim} if s.head_dim else {}


# Families: model_type -> the transformers config keys of a Shape. Adding one is one line.
FAMILIES = {
    "llama": _gated,
    "mistral": lambda s: dict(_gated(s), sliding_window=None),
    "qwen2": _gated,  # adds q/k/v biases
    "gpt_neox": lambda s: dict(hidden_size=s.hidden, intermediate_size=4 * s.hidden, num_hidden_layers=s.layers,
                               num_attention_heads=s.heads),  # ungated MLP of 4 x hidden: ~ the same bytes
    "mixtral": lambda s: dict(_gated(s), **_head_dim(s), num_local_experts=s.experts, num_experts_per_tok=s.top_k,
                              sliding_window=None),
    "qwen3_moe": lambda s: dict(_gated(s), **_head_dim(s), moe_intermediate_size=s.intermediate, num_experts=s.experts,
                                num_experts_per_tok=s.top_k, decoder_sparse_step=1, mlp_only_layers=[],
                                norm_topk_prob=True),  # every layer a mixture, as in the real models
}
LADDERS = {"mixtral": MIXTRAL_LADDER, "qwen3_moe": QWEN3_MOE_LADDER}  # the rest: LADDER


def parse_params(params) -> int:
    """Parameter count of "1B", "1.1b", "350M", "20k" or a plain number."""
    if isinstance(params, (int, float)) and not isinstance(params, bool):
        n = int(params)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMbBgGtT]?)\s*", str(params))
        if not m:
            raise SynthError(f"parameter count {params!r} does not parse (expected e.g. '1B', '350M')")
        n = int(float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}[m.group(2).lower()])
    if n <= 0:
        raise SynthError(f"parameter count must be positive, got {params!r}")
    return n


def model_config(arch: str, shape: Shape, dtype: str = "bfloat16"):
    """The transformers config of `arch` at `shape`, with the token ids of the synthetic tokenizer."""
    from transformers import AutoConfig

    if arch not in FAMILIES:
        raise SynthError(f"--arch {arch!r} is not supported (choose from {', '.join(FAMILIES)})")
    if shape.vocab < 256 + len(SPECIAL_TOKENS):
        raise SynthError(f"vocab {shape.vocab} is smaller than the byte-level tokenizer ({256 + len(SPECIAL_TOKENS)} tokens)")
    return AutoConfig.for_model(arch, **FAMILIES[arch](shape), vocab_size=shape.vocab, max_position_embeddings=2048,
                                bos_token_id=256, eos_token_id=257, pad_token_id=258, tie_word_embeddings=False,
                                dtype=dtype)


@functools.lru_cache(maxsize=None)
def count_params(arch: str, shape: Shape) -> tuple[int, int]:
    """(parameters outside the decoder layers, parameters of one decoder layer) of `arch` at `shape`."""
    from .hf import build_meta_model, find_decoder_layers

    meta = build_meta_model(model_config(arch, Shape(**{**asdict(shape), "layers": 1})))
    total = sum(p.numel() for p in meta.parameters())
    per_layer = sum(p.numel() for p in find_decoder_layers(meta)[1][0].parameters())
    return total - per_layer, per_layer


def _overrides(arch: str, vocab, experts, top_k) -> dict:
    """The Shape fields the caller sets over a ladder rung, checked."""
    if arch not in FAMILIES:
        raise SynthError(f"--arch {arch!r} is not supported (choose from {', '.join(FAMILIES)})")
    out = {"vocab": vocab} if vocab else {}
    if arch not in LADDERS:
        if experts or top_k:
            raise SynthError(f"--arch {arch} is not a mixture of experts: --experts/--top-k apply to {', '.join(LADDERS)} only")
        return out
    if experts is not None:
        if experts < 1:
            raise SynthError(f"--experts must be at least 1, got {experts}")
        out["experts"] = experts
    if top_k is not None:
        if top_k < 1:
            raise SynthError(f"--top-k must be at least 1, got {top_k}")
        out["top_k"] = top_k
    return out


def choose_shape(arch: str, params, vocab: int | None = None, experts: int | None = None, top_k: int | None = None) -> Shape:
    """A plausible shape of about `params` parameters for `arch` (see the module docstring).

    Args:
        params: the requested count ("1B", 350_000_000).
        vocab: override the vocabulary (default 32000); tiny models need a small one.
        experts, top_k: mixtures of experts only: override the rungs' experts per layer / experts per token.
    Raises:
        SynthError: unknown arch, or a count too small for one layer plus the embeddings, or top_k > experts.
    """
    target = parse_params(params)
    over = _overrides(arch, vocab, experts, top_k)
    fits = []
    for rung in LADDERS.get(arch, LADDER):
        rung = Shape(**{**asdict(rung), **over})
        if rung.top_k > rung.experts:
            raise SynthError(f"top-k {rung.top_k} is more than the {rung.experts} experts per layer")
        fixed, per_layer = count_params(arch, rung)
        fits.append((abs(math.log((fixed + rung.layers * per_layer) / target)), rung, fixed, per_layer))
    _, rung, fixed, per_layer = min(fits, key=lambda f: f[0])
    if abs((fixed + rung.layers * per_layer) / target - 1) <= TOLERANCE:
        return rung
    layers = round((target - fixed) / per_layer)
    if layers < 1:
        raise SynthError(f"{arch} with {target:,} parameters: the embeddings and head alone take {fixed:,} "
                         f"(vocab {rung.vocab}); ask for more parameters or a smaller vocab")
    return Shape(**{**asdict(rung), "layers": layers})


def published_entries(meta) -> list[tuple[str, tuple[int, ...], bool]]:
    """(name, shape, prunable) of every tensor of the checkpoint `meta` (a meta-device model) saves, in order.

    Names and shapes are those of transformers' save_pretrained: its conversion mapping for the model
    reversed one parameter at a time (fused experts become one tensor per expert, renamed as published;
    most models have no mapping and keep their names). Inside a decoder layer the tensors are in the
    natural order of their names (expert 0's matrices, then expert 1's, ...); outside, in module order.
    Prunable: the linear weights of the decoder layers and the matrices of their experts.
    """
    from transformers.core_model_loading import revert_weight_conversion

    from .hf import model_info

    info = model_info(meta)
    params = dict(meta.named_parameters())
    groups: dict = {}  # layer index (None outside the layers, keyed by name) -> entries
    for name in info.param_names:
        if name in info.tied or name not in params:
            continue
        p = params[name]
        layer = info.layer_of(name)
        expert = layer is not None and p.dim() == 3 and not name.endswith("bias")
        prunable = name in info.linear_weights or expert
        saved = revert_weight_conversion(meta, {name: p})  # on the meta device: names and shapes only
        rows = [(k, tuple(v.shape), prunable and v.dim() == 2) for k, v in saved.items()]
        groups.setdefault(name if layer is None else layer, []).extend(rows)
    out = []
    for key, rows in groups.items():
        out.extend(rows if not isinstance(key, int) else sorted(rows, key=lambda r: _natural(r[0])))
    return out


def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _seed_of(seed: int, name: str) -> int:
    """A 63-bit seed for one tensor: independent of the order tensors are generated in."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1


@torch.no_grad()
def magnitude_prune_(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Zero exactly round(sparsity * numel) entries of `w`, those of smallest magnitude; in place.

    The k-th smallest |w| is found by selection (numpy's introselect, linear time) and used as the
    threshold; ties at the threshold, which random float32 values almost never have, fall back to a
    stable sort.
    """
    import numpy as np

    k = round(sparsity * w.numel())
    if k == 0:
        return w
    flat = w.view(-1)
    if k >= flat.numel():
        flat.zero_()
        return w
    a = flat.abs()
    t = float(np.partition(a.float().numpy(), k - 1)[k - 1])
    mask = a <= t
    if int(mask.sum()) != k:
        mask = torch.zeros_like(mask)
        mask[torch.argsort(a, stable=True)[:k]] = True
    flat.masked_fill_(mask, 0)
    return w


def make_tensor(name: str, shape: tuple[int, ...], *, seed: int, sparsity: float, prunable: bool,
                dtype: torch.dtype) -> torch.Tensor:
    """The synthetic value of parameter `name`: N(0, STD) (pruned if `prunable`), ones for norms, zeros for biases."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "bias":
        return torch.zeros(shape, dtype=dtype)
    if len(shape) == 1:  # norm weights (RMSNorm / LayerNorm scale)
        return torch.ones(shape, dtype=dtype)
    g = torch.Generator().manual_seed(_seed_of(seed, name))
    w = torch.randn(shape, generator=g, dtype=torch.float32).mul_(STD)
    if prunable and sparsity > 0:
        magnitude_prune_(w, sparsity)  # in float32: no ties, and bf16 rounding keeps the order
    return w.to(dtype)


def _shards(entries: list[tuple[str, tuple[int, ...]]], itemsize: int, shard_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    shards, cur, size = [], [], 0
    for name, shape in entries:
        nb = math.prod(shape) * itemsize
        if cur and size + nb > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, shape))
        size += nb
    if cur:
        shards.append(cur)
    return shards


def _safetensors_header(entries, itemsize: int, st_dtype: str) -> bytes:
    """The 8-byte length + JSON header of a safetensors file holding `entries` in order."""
    header, off = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in entries:
        nb = math.prod(shape) * itemsize
        header[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [off, off + nb]}
        off += nb
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-aligned
    return struct.pack("<Q", len(raw)) + raw


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer without merges: 256 byte tokens, 4 special tokens, then filler
    tokens `<|t{i}|>` up to `vocab_size` so that every id the model can emit decodes to text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for t in SPECIAL_TOKENS.values():
        vocab[t] = len(vocab)
    while len(vocab) < vocab_size:
        vocab[f"<|t{len(vocab)}|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS).save_pretrained(folder)


def read_marker(folder) -> dict | None:
    """The record `synth` left in a complete folder, or None."""
    p = Path(folder) / MARKER
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def synth(out, *, arch: str = "llama", params="1B", sparsity: float = 0.5, seed: int = 0, dtype: str = "bfloat16",
          vocab: int | None = None, experts: int | None = None, top_k: int | None = None, shape: Shape | None = None,
          shard_bytes: int = 1 << 30, force: bool = False, progress: bool = True) -> dict:
    """Write a synthetic HuggingFace causal LM folder at `out`, streaming tensor by tensor.

    Args:
        arch: a key of FAMILIES ("llama", "mistral", "qwen2", "gpt_neox", "mixtral", "qwen3_moe").
        params: requested parameter count ("1B"); ignored when `shape` is given.
        sparsity: fraction of each decoder linear weight zeroed by magnitude, in [0, 1).
        seed: weights are a function of (seed, tensor name) only.
        dtype: "bfloat16", "float16" or "float32".
        vocab: vocabulary size (default 32000; at least 260).
        experts, top_k: mixtures of experts: experts per layer and per token (default: the ladder's,
            8 and 2 for mixtral, 128 and 8 for qwen3_moe; 64 in its smallest rungs).
        shape: an explicit Shape instead of one chosen from `params`.
        shard_bytes: maximum bytes of one safetensors shard.
        force: replace an existing `out`; without it an existing folder made with the same settings is
            reused (returned as is) and any other existing folder is an error.
    Returns:
        the record also written to `out/synth.json`: arch, shape, params (actual), requested_params,
        sparsity, seed, dtype, std, bytes (weights on disk), seconds.
    Raises:
        SynthError for bad arguments or an `out` that exists with other settings.
    """
    out = Path(out)
    if dtype not in _DTYPES:
        raise SynthError(f"dtype {dtype!r} is not supported (choose from {', '.join(_DTYPES)})")
    if not 0 <= sparsity < 1:
        raise SynthError(f"sparsity must be in [0, 1), got {sparsity}")
    shape = shape or choose_shape(arch, params, vocab=vocab, experts=experts, top_k=top_k)
    want = {"arch": arch, "shape": shape_record(shape), "sparsity": sparsity, "seed": seed, "dtype": dtype, "std": STD}
    if out.exists() and not force:
        have = read_marker(out)
        if have is not None and {k: have.get(k) for k in want} == want:
            return have
        raise SynthError(f"{out}: already exists (and was not made by synth with these settings); pass force=True / --force")
    from .guard import prepare_output

    prepare_output(out, force=force)  # --force replaces only a sparseferry output or an empty folder

    from tqdm import tqdm

    from .hf import build_meta_model

    t0 = time.perf_counter()
    config = model_config(arch, shape, dtype)
    meta = build_meta_model(config)
    published = published_entries(meta)
    entries = [(n, s) for n, s, _ in published]
    prunable = {n for n, _, p in published if p}
    nparams = sum(math.prod(s) for _, s in entries)
    torch_dtype, st_dtype = _DTYPES[dtype]
    itemsize = torch.empty((), dtype=torch_dtype).element_size()
    shards = _shards(entries, itemsize, shard_bytes)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])

    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
    except OSError as e:
        raise SynthError(f"{out}: cannot create {tmp} ({e.strerror})") from None
    bar = tqdm(total=nparams * itemsize, unit="B", unit_scale=True, desc=f"synth {arch} {nparams / 1e9:.2f}B",
               disable=not progress)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # per-tensor work is memory-bound and the selection single-threaded anyway; on a
    # busy machine, waiting for a descheduled pool thread at every small op costs far more than it gains
    try:
        weight_map = {}
        for fname, shard in zip(names, shards):
            with open(tmp / fname, "wb") as f:
                f.write(_safetensors_header(shard, itemsize, st_dtype))
                for name, shp in shard:
                    t = make_tensor(name, shp, seed=seed, sparsity=sparsity, prunable=name in prunable,
                                    dtype=torch_dtype)
                    f.write(memoryview(t.contiguous().view(-1).view(torch.uint8).numpy()))
                    weight_map[name] = fname
                    bar.update(t.numel() * itemsize)
                    del t
        if len(shards) > 1:
            index = {"metadata": {"total_size": nparams * itemsize}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        config.save_pretrained(tmp)
        from transformers import GenerationConfig

        GenerationConfig.from_model_config(config).save_pretrained(tmp)
        write_tokenizer(tmp, shape.vocab)
        record = dict(want, params=nparams, requested_params=parse_params(params) if params is not None else nparams,
                      bytes=nparams * itemsize, seconds=time.perf_counter() - t0)
        (tmp / MARKER).write_text(json.dumps(record, indent=1))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except OSError as e:  # out of disk space, permissions: one line, nothing left behind
        shutil.rmtree(tmp, ignore_errors=True)
        what = Path(e.filename).name if e.filename else "the model"
        raise SynthError(f"{out}: {e.strerror or e} while writing {what}; nothing was written") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        torch.set_num_threads(threads)
        bar.close()
    return record
