"""`sparseferry convert`: a HuggingFace checkpoint folder -> a sparseferry checkpoint.

Streams tensor by tensor (safetensors by mmap, *.bin with torch.load(mmap=True, weights_only=True)):
only one decoder layer's encoded tensors are held at a time, so a checkpoint much larger than RAM
converts. Also imports compressed-tensors "sparse-bitmask" checkpoints without re-pruning.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .format import BitmapTensor, decode
from .hf import ModelError, info_from_config_dict, read_config_dict
from .hf_folder import HFWeights, SourceError, SourceWeights, sparse_bitmask_config  # noqa: F401 - re-exported
from .runtime.hf_compat import check_local_path
from .guard import check_source_file, prepare_output
from .quant import default_group_size
from .store import (
    EXTRA_FILE,
    CheckpointError,
    CheckpointWriter,
    StoredTensor,
    from_bitmap,
    layer_file,
    prepare,
    prepare_experts,
)

VALUE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# --values: how the non-zero values of bitmap-encoded matrices are stored (docs/FORMAT.md, 1 and 1b)
VALUE_FORMATS = {"bf16": torch.bfloat16, "fp16": torch.float16, "int8": "int8", "int4": "int4"}
_COPY_SKIP = {"config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json"}


# The source folder cannot be converted (its files, tensors or conversion rules; hf_folder.py).
ConvertError = SourceError


def convert(src, dst, *, encode_lm_head: bool = False, encode_embeddings: bool = False, dtype: str | None = None,
            values: str | None = None, group_size: int | None = None, force: bool = False,
            progress: bool = True) -> dict:
    """Convert a HuggingFace folder `src` into a sparseferry checkpoint at `dst`.

    Args:
        encode_lm_head / encode_embeddings: also store those matrices in the bitmap format.
        dtype: cast floating-point weights to "bfloat16" / "float16" / "float32" (default: keep).
        values: the non-zero values of the bitmap-encoded matrices: "bf16" / "fp16" (cast; only those
            matrices, --dtype casts everything) or "int8" / "int4" (quantized, docs/FORMAT.md 1b; they
            dequantize to the matrix's dtype). Default: as they are.
        group_size: non-zeros per quantization group along a row (int8/int4); 0 = one scale per row;
            None = the format's default (512 for int8, 128 for int4: `quant.default_group_size`).
        force: replace an existing `dst` (only once the new checkpoint is complete).
    Returns:
        statistics: tensors, dense_bytes, stored_bytes, seconds, GB/s (dense GB processed per second);
        with quantized values also quantized (tensors) and max_rel_error (worst ||W - W'|| / ||W||).
    Raises:
        ConvertError / CheckpointError / ModelError with the file and tensor at fault.
    """
    check_local_path(src)
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise ConvertError(f"{src}: no such folder")
    prepare_output(dst, force=force, sources=[src])  # before any work: never the source, only our own outputs
    cfg = read_config_dict(src)
    cast = None
    if dtype is not None:
        if dtype not in VALUE_DTYPES:
            raise ConvertError(f"unsupported --dtype {dtype!r} (choose from {', '.join(VALUE_DTYPES)})")
        cast = VALUE_DTYPES[dtype]
    if values is not None and values not in VALUE_FORMATS:
        raise ConvertError(f"unsupported --values {values!r} (choose from {', '.join(VALUE_FORMATS)})")
    quant = values if values in ("int8", "int4") else None
    if group_size is None and quant:
        group_size = default_group_size(quant)
    if group_size is not None and (not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 0):
        raise ConvertError(f"--group-size {group_size!r}: expected a non-negative integer (0 = one group per row)")
    value_cast = VALUE_FORMATS[values] if values is not None and quant is None else None
    _, meta_model, info = info_from_config_dict(cfg)
    source = HFWeights(src, meta_model, info, cfg)  # every parameter mapped to its source, nothing read yet
    ct = source.ct
    out_cfg = {k: v for k, v in cfg.items() if k not in ("quantization_config", "compression_config")}
    if cast is not None:
        out_cfg["torch_dtype"] = out_cfg["dtype"] = dtype
    tied = {t: s for t, s in info.tied.items() if not source.has(t)}
    source.check_complete(tied)

    sparse_names = set(info.linear_weights) | set(info.expert_params)
    if encode_lm_head:
        sparse_names |= info.top_linear_weights
    if encode_embeddings:
        sparse_names |= info.embedding_weights

    def load(name: str) -> StoredTensor:
        s = source.stored(name)
        if isinstance(s, BitmapTensor):  # compressed-tensors: the values as they are
            bt = s
            source.check_shape(name, bt)
            if cast is not None and bt.dtype != cast:
                bt.values = bt.values.to(cast)
            if value_cast is not None and bt.dtype != value_cast:
                bt.values = bt.values.to(value_cast)
            if quant is not None:
                return prepare(name, decode(bt), sparse=True, values=quant, group_size=group_size)
            return from_bitmap(name, bt)
        w = s
        source.check_shape(name, w)
        if cast is not None and w.is_floating_point():
            w = w.to(cast)
        if name in sparse_names and w.dtype not in VALUE_DTYPES.values():
            # float64 (or fp8) converts with an explicit cast; integer weights are quantized: refused
            hint = ("use --dtype bfloat16, float16 or float32 to cast it" if w.is_floating_point()
                    else "integer (quantized) weights cannot be stored in the bitmap format")
            raise ConvertError(f"{source.source_file(name) or src}: tensor {source.source_key(name)} has dtype {w.dtype}; "
                               f"expected bfloat16, float16 or float32 ({hint})")
        if name in sparse_names and value_cast is not None and w.dtype != value_cast:
            w = w.to(value_cast)
        if name in info.expert_params:  # one stored tensor per expert (docs/FORMAT.md 2b)
            return prepare_experts(name, w, sparse=True, num_experts=info.expert_params[name], values=quant,
                                   group_size=group_size)
        return prepare(name, w, sparse=name in sparse_names, values=quant, group_size=group_size)

    buffers = source.buffers()
    stored_names = [n for n in info.param_names if n not in tied] + buffers
    groups: list[tuple[str, int | None, list[str]]] = []
    for i in range(info.num_layers):
        groups.append((layer_file(i), i, [n for n in info.layer_params(i) if n in stored_names]
                       + [n for n in buffers if info.layer_of(n) == i]))
    groups.append((EXTRA_FILE, None, [n for n in stored_names if info.layer_of(n) is None]))
    total_bytes = sum(source.nbytes(n) for n in stored_names)

    from tqdm import tqdm

    t0 = time.perf_counter()
    stats = {"tensors": 0, "dense_bytes": 0, "stored_bytes": 0}
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=f"convert {src.name}", disable=not progress)
    writer = CheckpointWriter(dst, config=out_cfg, architecture=info.architecture, layers_prefix=info.layers_prefix,
                              num_layers=info.num_layers, tied=tied, force=force, sources=[src],
                              extra={"source": {"path": str(src.resolve()), "compressed_tensors": ct is not None,
                                                "keys": _renamed_keys(source, stored_names)}}
                              | ({"values": {"format": quant, "group_size": group_size}} if quant else {}))
    with writer, bar:  # on error: the bar ends its line before the error is printed, the writer cleans up
        for rel, layer, group in groups:
            stored = []
            for n in group:
                st = load(n)
                stored.append(st)
                stats["tensors"] += 1
                dense = _dense_nbytes(st)
                stats["dense_bytes"] += dense
                for piece in st.experts if st.experts is not None else [st]:  # an expert parameter: per expert
                    stats["stored_bytes"] += sum(t.numel() * t.element_size() for t in piece.parts.values())
                    if "rel_error" in piece.meta:
                        stats["quantized"] = stats.get("quantized", 0) + 1
                        stats["max_rel_error"] = max(stats.get("max_rel_error", 0.0), piece.meta["rel_error"])
                bar.update(dense)
                bar.set_postfix_str(f"{stats['tensors']} tensors", refresh=False)
            writer.write_file(rel, stored, layer)
            del stored
        for f in sorted(src.iterdir()):
            if (f.is_dir() and not f.is_symlink()) or f.name in _COPY_SKIP or f.suffix in (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf"):
                continue
            if not f.is_symlink() or f.is_file():
                writer.copy_file(check_source_file(src, f))
            elif not f.resolve().is_relative_to(src.resolve()):  # a link to a folder or to nothing, outside
                check_source_file(src, f)  # raises: names the link and its target
        writer.write_config("config.json", out_cfg)
        writer.commit()
    secs = time.perf_counter() - t0
    stats.update(seconds=secs, gbps=stats["dense_bytes"] / secs / 1e9 if secs else 0.0)
    return stats


def _renamed_keys(source: HFWeights, names) -> dict[str, str]:
    """{parameter name: source key} where they differ, so `export` can write the source's names back."""
    keys = {n: source.source_key(n) for n in names}
    return {n: k for n, k in keys.items() if n != k}


def _dense_nbytes(st: StoredTensor) -> int:
    n = 1
    for s in st.shape:
        n *= s
    return n * st.dtype.itemsize
