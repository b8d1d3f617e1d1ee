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

from .errors import SparseferryError
from .format import BitmapTensor, FormatError, decode
from .guard import check_source_file, prepare_output
from .hf import ModelError, info_from_config_dict, normalize_key, read_config_dict
from .store import (
    EXTRA_FILE,
    CheckpointError,
    CheckpointWriter,
    StoredTensor,
    from_bitmap,
    layer_file,
    prepare,
)

VALUE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# --values: how the non-zero values of bitmap-encoded matrices are stored (docs/FORMAT.md, 1 and 1b)
VALUE_FORMATS = {"bf16": torch.bfloat16, "fp16": torch.float16, "int8": "int8", "int4": "int4"}
_COPY_SKIP = {"config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json"}
_CT_PARTS = ("shape", "compressed", "bitmask", "row_offsets")


class ConvertError(SparseferryError):
    """The source folder cannot be converted."""


class SourceWeights:
    """Lazy, by-name access to the tensors of a HuggingFace folder (safetensors or *.bin, sharded or not)."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self.folder = Path(folder)
        self._where: dict[str, Path] = {}
        self._handles: dict[Path, object] = {}
        self._bins: dict[Path, dict] = {}
        st_files = sorted(self.folder.glob("*.safetensors"))
        bin_files = sorted(p for p in self.folder.glob("*.bin") if p.name != "training_args.bin")
        for p in st_files + bin_files:
            check_source_file(self.folder, p)  # a FIFO would block, a link out of the folder read another file
        if not st_files and not bin_files:
            raise ConvertError(f"{self.folder}: no weights (*.safetensors or *.bin) found")
        for p in st_files:
            try:
                h = safe_open(p, framework="pt")
            except Exception as e:  # noqa: BLE001 - safetensors raises several error types
                raise ConvertError(f"{p}: not a readable safetensors file ({e})") from None
            self._handles[p] = h
            for k in h.keys():
                self._where[k] = p
        if not st_files:
            for p in bin_files:
                try:
                    sd = torch.load(p, map_location="cpu", mmap=True, weights_only=True)
                except Exception as e:  # noqa: BLE001 - pickle / zip errors
                    raise ConvertError(f"{p}: cannot be read as a PyTorch state dict ({e})") from None
                if not isinstance(sd, dict):
                    raise ConvertError(f"{p}: expected a state dict, found {type(sd).__name__}")
                self._bins[p] = sd
                for k in sd:
                    self._where[k] = p
        self._check_sizes(st_files)

    def _check_sizes(self, files) -> None:
        """Catch truncated shards up front: the header's last offset must match the file size."""
        import struct

        for p in files:
            with open(p, "rb") as f:
                n = struct.unpack("<Q", f.read(8))[0]
                header = json.loads(f.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            if 8 + n + end != p.stat().st_size:
                raise ConvertError(f"{p}: truncated or corrupted ({p.stat().st_size} bytes, header says {8 + n + end})")

    def keys(self):
        return self._where.keys()

    def get(self, key: str) -> torch.Tensor:
        p = self._where[key]
        if p in self._handles:
            try:
                return self._handles[p].get_tensor(key)
            except Exception as e:  # noqa: BLE001
                raise ConvertError(f"{p}: cannot read tensor {key} ({e})") from None
        return self._bins[p][key]


def sparse_bitmask_config(cfg: dict) -> dict | None:
    """The compressed-tensors sparsity config if the source is a sparse-bitmask checkpoint."""
    qc = cfg.get("quantization_config") or cfg.get("compression_config")
    if not isinstance(qc, dict):
        return None
    sc = qc.get("sparsity_config") or {}
    if sc.get("format") not in ("sparse-bitmask", "sparse_bitmask"):
        return None
    if qc.get("config_groups") and qc.get("format") not in (None, "dense"):
        raise ConvertError(f"compressed-tensors checkpoint is quantized (format {qc.get('format')!r}): only dense-valued sparse-bitmask is supported")
    return sc


def convert(src, dst, *, encode_lm_head: bool = False, encode_embeddings: bool = False, dtype: str | None = None,
            values: str | None = None, group_size: int = 128, force: bool = False, progress: bool = True) -> dict:
    """Convert a HuggingFace folder `src` into a sparseferry checkpoint at `dst`.

    Args:
        encode_lm_head / encode_embeddings: also store those matrices in the bitmap format.
        dtype: cast floating-point weights to "bfloat16" / "float16" / "float32" (default: keep).
        values: the non-zero values of the bitmap-encoded matrices: "bf16" / "fp16" (cast; only those
            matrices, --dtype casts everything) or "int8" / "int4" (quantized, docs/FORMAT.md 1b; they
            dequantize to the matrix's dtype). Default: as they are.
        group_size: non-zeros per quantization group along a row (int8/int4); 0 = one scale per row.
        force: replace an existing `dst` (only once the new checkpoint is complete).
    Returns:
        statistics: tensors, dense_bytes, stored_bytes, seconds, GB/s (dense GB processed per second);
        with quantized values also quantized (tensors) and max_rel_error (worst ||W - W'|| / ||W||).
    Raises:
        ConvertError / CheckpointError / ModelError with the file and tensor at fault.
    """
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
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 0:
        raise ConvertError(f"--group-size {group_size!r}: expected a non-negative integer (0 = one group per row)")
    quant = values if values in ("int8", "int4") else None
    value_cast = VALUE_FORMATS[values] if values is not None and quant is None else None
    _, meta_model, info = info_from_config_dict(cfg)
    rename = _source_key_renamer(meta_model)
    weights = SourceWeights(src)
    ct = sparse_bitmask_config(cfg)
    out_cfg = {k: v for k, v in cfg.items() if k not in ("quantization_config", "compression_config")}
    if cast is not None:
        out_cfg["torch_dtype"] = out_cfg["dtype"] = dtype

    # Map every model parameter to its source: a dense key, or a compressed-tensors part group.
    names = set(info.param_names)
    dense_src: dict[str, str] = {}
    for k in weights.keys():
        n = normalize_key(k, names, info.base_prefix) or normalize_key(rename(k), names, info.base_prefix)
        if n is not None:
            dense_src[n] = k
    bitmap_src: dict[str, str] = {}
    if ct is not None:
        for k in weights.keys():
            if k.endswith(".compressed"):
                wk = k.removesuffix(".compressed") + ".weight"
                n = normalize_key(wk, names, info.base_prefix) or normalize_key(rename(wk), names, info.base_prefix)
                if n is not None and n not in dense_src:
                    bitmap_src[n] = k.removesuffix(".compressed")
    tied = {t: s for t, s in info.tied.items() if t not in dense_src and t not in bitmap_src}
    missing = [n for n in info.param_names if n not in dense_src and n not in bitmap_src and n not in tied]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ConvertError(f"{src}: weights missing for {', '.join(missing[:5])}{more}")

    sparse_names = set(info.linear_weights)
    if encode_lm_head:
        sparse_names |= info.top_linear_weights
    if encode_embeddings:
        sparse_names |= info.embedding_weights

    def load(name: str) -> StoredTensor:
        if name in bitmap_src:
            p = bitmap_src[name]
            try:
                parts = {part: weights.get(f"{p}.{part}") for part in _CT_PARTS}
                bt = BitmapTensor.from_parts(parts, p)
            except KeyError as e:
                raise ConvertError(f"{src}: compressed tensor {p} lacks part {e}") from None
            except FormatError as e:
                raise ConvertError(f"{src}: {e}") from None
            if cast is not None and bt.dtype != cast:
                bt.values = bt.values.to(cast)
            if value_cast is not None and bt.dtype != value_cast:
                bt.values = bt.values.to(value_cast)
            if quant is not None:
                return prepare(name, decode(bt), sparse=True, values=quant, group_size=group_size)
            return from_bitmap(name, bt)
        w = weights.get(dense_src[name])
        if cast is not None and w.is_floating_point():
            w = w.to(cast)
        if name in sparse_names and w.dtype not in VALUE_DTYPES.values():
            # float64 (or fp8) converts with an explicit cast; integer weights are quantized: refused
            hint = ("use --dtype bfloat16, float16 or float32 to cast it" if w.is_floating_point()
                    else "integer (quantized) weights cannot be stored in the bitmap format")
            raise ConvertError(f"{weights._where[dense_src[name]]}: tensor {dense_src[name]} has dtype {w.dtype}; "
                               f"expected bfloat16, float16 or float32 ({hint})")
        if name in sparse_names and value_cast is not None and w.dtype != value_cast:
            w = w.to(value_cast)
        return prepare(name, w, sparse=name in sparse_names, values=quant, group_size=group_size)

    stored_names = [n for n in info.param_names if n not in tied]
    groups: list[tuple[str, int | None, list[str]]] = []
    for i in range(info.num_layers):
        groups.append((layer_file(i), i, [n for n in info.layer_params(i) if n in stored_names]))
    groups.append((EXTRA_FILE, None, [n for n in stored_names if info.layer_of(n) is None]))
    total_bytes = sum(_nbytes(weights, dense_src.get(n), bitmap_src.get(n)) for n in stored_names)

    from tqdm import tqdm

    t0 = time.perf_counter()
    stats = {"tensors": 0, "dense_bytes": 0, "stored_bytes": 0}
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=f"convert {src.name}", disable=not progress)
    writer = CheckpointWriter(dst, config=out_cfg, architecture=info.architecture, layers_prefix=info.layers_prefix,
                              num_layers=info.num_layers, tied=tied, force=force, sources=[src],
                              extra={"source": {"path": str(src.resolve()), "compressed_tensors": ct is not None}}
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
                stats["stored_bytes"] += sum(t.numel() * t.element_size() for t in st.parts.values())
                if "rel_error" in st.meta:
                    stats["quantized"] = stats.get("quantized", 0) + 1
                    stats["max_rel_error"] = max(stats.get("max_rel_error", 0.0), st.meta["rel_error"])
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


def _source_key_renamer(model):
    """checkpoint key -> the model's parameter name, by transformers' own renaming rules.

    Some architectures keep historical names in their checkpoints (GPT-NeoX saves `lm_head` as
    `embed_out`); transformers renames them on load and we must do the same. Only pure renames
    are applied (transforms that merge or split tensors cannot be streamed tensor by tensor);
    where transformers has no such rules, keys are kept as they are.
    """
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming

        rules = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    except Exception:  # noqa: BLE001 - older transformers: no renaming rules
        return lambda key: key

    def rename(key: str) -> str:
        for rule in rules:
            key = rule.rename_source_key(key)[0]
        return key

    return rename


def _dense_nbytes(st: StoredTensor) -> int:
    n = 1
    for s in st.shape:
        n *= s
    return n * st.dtype.itemsize


def _nbytes(weights: SourceWeights, dense_key: str | None, bitmap_prefix: str | None) -> int:
    """Dense bytes of a source tensor without reading it (for the progress bar)."""
    try:
        if dense_key is not None:
            p = weights._where[dense_key]
            if p in weights._handles:
                sl = weights._handles[p].get_slice(dense_key)
                n = 1
                for s in sl.get_shape():
                    n *= s
                return n * _ST_ITEMSIZE.get(sl.get_dtype(), 2)
            t = weights._bins[p][dense_key]
            return t.numel() * t.element_size()
        shape = weights.get(f"{bitmap_prefix}.shape").tolist()
        return int(shape[0]) * int(shape[1]) * weights.get(f"{bitmap_prefix}.compressed").element_size()
    except Exception:  # noqa: BLE001 - only for the progress bar
        return 0


_ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


__all__ = ["convert", "ConvertError", "ModelError", "SourceWeights"]
