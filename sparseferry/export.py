"""`sparseferry export`: a sparseferry checkpoint -> a folder other tools load (docs/FORMAT.md, section 6).

    hf                  plain sharded safetensors (`model-0000k-of-0000N.safetensors` + index), config,
                        generation config, tokenizer: what transformers' `save_pretrained` writes, so
                        `from_pretrained`, vLLM and llama.cpp's `convert_hf_to_gguf.py` read it. Every
                        weight is dense; quantized values are dequantized.
    compressed-tensors  the "sparse-bitmask" layout as compressed-tensors 0.14.0.1 (the last release with
                        sparse compressors) writes it: each decoder-layer linear weight as
                        `P.shape / P.compressed / P.bitmask / P.row_offsets`, everything else dense, and
                        `quantization_config.sparsity_config` in config.json.

Streamed: one tensor is decoded at a time and its bytes appended to the current shard's data file;
a shard is finished (header + data) when the next tensor would overflow `max_shard_size`. The output
is written into a temporary sibling folder and renamed into place only when complete.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import time
from pathlib import Path

import torch

from .errors import SparseferryError
from .store import MANIFEST, Checkpoint, dtype_name, open_checkpoint

TARGETS = ("hf", "compressed-tensors")
EXPORT_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# The compressed-tensors release whose sparse-bitmask layout and config the export reproduces: the
# last one with sparse compressors (0.15.0 removed them).
CT_VERSION = "0.14.0.1"
CT_PARTS = ("shape", "compressed", "bitmask", "row_offsets")
_ST = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
       torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
_SKIP_FILES = {MANIFEST, "config.json", "extra.safetensors"}
_DISK_FULL = (28, 27, 122)  # ENOSPC, EFBIG, EDQUOT


class ExportError(SparseferryError):
    """The checkpoint cannot be exported as asked (bad target, dtype, destination, or out of space)."""


# ----------------------------------------------------------------------------------------------
# Sharded safetensors, written one tensor at a time


class ShardWriter:
    """Appends tensors to shards of at most `max_shard_size` bytes of data; `finish()` names them.

    Each shard's data goes to a temporary file first (its header, which lists every tensor's offset,
    is known only once the shard is complete); closing a shard writes header + data as one
    safetensors file with `{"format": "pt"}` metadata, as transformers' `save_pretrained` does.
    """

    def __init__(self, folder: Path, max_shard_size: int):
        self.folder, self.max = folder, max_shard_size
        self.shards: list[Path] = []
        self.weight_map: dict[str, int] = {}
        self.total = 0
        self._data = None
        self._header: dict = {}
        self._pos = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        if name in self.weight_map:
            raise ExportError(f"tensor {name} would be written twice")
        t = t.detach().contiguous().cpu()
        n = t.numel() * t.element_size()
        if self._data is not None and self._pos and self._pos + n > self.max:
            self._close()
        if self._data is None:
            self._data = open(self.folder / f".shard-{len(self.shards):05d}.data", "wb")
            self._header, self._pos = {}, 0
        self._header[name] = {"dtype": _ST[t.dtype], "shape": list(t.shape), "data_offsets": [self._pos, self._pos + n]}
        if n:
            self._data.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        self._pos += n
        self.total += n
        self.weight_map[name] = len(self.shards)

    def _close(self) -> None:
        data_path = Path(self._data.name)
        self._data.close()
        self._data = None
        header = dict(sorted(self._header.items()), __metadata__={"format": "pt"})
        hb = json.dumps(header, separators=(",", ":")).encode()
        hb += b" " * ((-len(hb)) % 8)
        path = self.folder / f".shard-{len(self.shards):05d}.safetensors"
        with open(path, "wb") as f, open(data_path, "rb") as src:
            f.write(struct.pack("<Q", len(hb)))
            f.write(hb)
            shutil.copyfileobj(src, f, 16 << 20)
            f.flush()
            os.fsync(f.fileno())
        data_path.unlink()
        self.shards.append(path)

    def finish(self) -> list[str]:
        """Close the last shard, rename all to model-0000k-of-0000N.safetensors, write the index."""
        if self._data is not None:
            self._close()
        n = len(self.shards)
        names = [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
        for p, final in zip(self.shards, names):
            os.rename(p, self.folder / final)
        index = {"metadata": {"total_size": self.total},
                 "weight_map": {k: names[v] for k, v in sorted(self.weight_map.items())}}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return names

    def abort(self) -> None:
        if self._data is not None:
            self._data.close()
            self._data = None


# ----------------------------------------------------------------------------------------------
# Names, tensors and configs


def original_names(meta_model, names, recorded: dict | None = None) -> dict[str, str]:
    """{model parameter name: the key a HuggingFace checkpoint stores it under}.

    `convert` applies transformers' renaming rules when it reads a source (GPT-NeoX's `embed_out`
    becomes `lm_head`) and records the source keys that differ in the manifest (`source.keys`);
    those come first. For other names transformers' own `revert_weight_conversion` (what
    `save_pretrained` runs) gives the key; a conversion that is not a pure rename keeps the name.
    """
    names = list(names)
    out = {n: n for n in names}
    try:
        from transformers.core_model_loading import revert_weight_conversion

        probe = {n: torch.tensor([i]) for i, n in enumerate(names)}  # which output key holds which name
        reverted = revert_weight_conversion(meta_model, dict(probe))
        back = {}
        for key, t in reverted.items():
            if isinstance(t, torch.Tensor) and t.numel() == 1 and t.dtype == torch.int64:
                back[names[int(t)]] = key
        if len(back) == len(names) and len(set(back.values())) == len(names):
            out = back
    except Exception:  # noqa: BLE001 - older transformers, or conversions that are not renames
        pass
    for n, key in (recorded or {}).items():
        if n in out:
            out[n] = key
    return out


def _linear_modules(meta_model, info, ckpt: Checkpoint) -> tuple[set[str], list[str], list[str]]:
    """(weights stored as sparse-bitmask, class names targeted, modules of those classes ignored)."""
    from .hf import is_linear

    compressed = set(info.linear_weights)
    compressed |= {n for n in info.top_linear_weights if n in ckpt.tensors and ckpt.tensors[n].encoding == "bitmap"}
    classes, ignore = set(), []
    for mname, mod in meta_model.named_modules():
        if is_linear(mod) and f"{mname}.weight" in compressed:
            classes.add(type(mod).__name__)
    for mname, mod in meta_model.named_modules():
        if type(mod).__name__ in classes and f"{mname}.weight" not in compressed:
            ignore.append(mname)
    return compressed, sorted(classes), ignore


def is_2_4(w: torch.Tensor) -> bool:
    """At most 2 non-zeros in every group of 4 consecutive columns of every row."""
    rows, cols = w.shape
    if cols % 4:
        return False
    return bool(((w != 0).view(rows, cols // 4, 4).sum(-1) <= 2).all())


def sparsity_config(*, targets: list[str], ignore: list[str], global_sparsity: float, structure: str) -> dict:
    """`quantization_config` of a sparse-bitmask checkpoint, as compressed-tensors' ModelCompressor.update_config writes it."""
    return {
        "quant_method": "compressed-tensors",
        "sparsity_config": {"format": "sparse-bitmask", "global_sparsity": global_sparsity, "ignore": ignore,
                            "sparsity_structure": structure, "targets": targets},
        "transform_config": {},
        "version": CT_VERSION,
    }


def _parse_size(size) -> int:
    from .runtime.budget import parse_budget

    try:
        n = parse_budget(size)
    except SparseferryError as e:
        raise ExportError(f"max_shard_size {size!r} does not parse (expected e.g. '5GB', '500MB')") from e
    return n


# ----------------------------------------------------------------------------------------------
# The export


def export(checkpoint, out, *, to: str = "hf", dtype: str | None = None, max_shard_size="5GB", force: bool = False,
           progress: bool = True) -> dict:
    """Write the sparseferry checkpoint `checkpoint` as a folder other tools load (see the module docstring).

    Args:
        to: "hf" (dense, plain sharded safetensors) or "compressed-tensors" (sparse-bitmask layout).
        dtype: cast every floating-point tensor to "bfloat16" / "float16" / "float32" (default: as stored;
            quantized values dequantize to the dtype they were converted from).
        max_shard_size: bytes of tensor data per shard ("5GB", "500MB", or an int).
        force: replace an existing `out` (only once the new folder is complete).
    Returns:
        {"path", "to", "tensors", "bytes", "shards", "seconds"}; compressed-tensors also "compressed" (matrices).
    Raises:
        ExportError (bad arguments, destination exists, out of space), CheckpointError (corrupt checkpoint).
    """
    from tqdm import tqdm

    from .encoder import encode_fast
    from .hf import info_from_config_dict
    from .runtime.hf_compat import check_local_path

    if to not in TARGETS:
        raise ExportError(f"export target {to!r}: choose from {', '.join(TARGETS)}")
    if dtype is not None and dtype not in EXPORT_DTYPES:
        raise ExportError(f"export dtype {dtype!r}: choose from {', '.join(EXPORT_DTYPES)}")
    cast = EXPORT_DTYPES.get(dtype)
    shard_bytes = _parse_size(max_shard_size)
    check_local_path(checkpoint)
    ckpt = open_checkpoint(checkpoint)
    out = Path(out)
    if out.exists() and not force:
        raise ExportError(f"{out}: already exists (pass --force to overwrite)")
    _, meta_model, info = info_from_config_dict(ckpt.config)
    keys = original_names(meta_model, ckpt.tensors, (ckpt.manifest.get("source") or {}).get("keys"))
    compressed, classes, ignore = _linear_modules(meta_model, info, ckpt) if to == "compressed-tensors" else (set(), [], [])

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    writer = ShardWriter(tmp, shard_bytes)
    t0 = time.perf_counter()
    zeros = numel = 0
    structure_24 = True
    names = list(ckpt.tensors)  # manifest order: layer after layer, then the rest
    bar = tqdm(total=ckpt.dense_bytes(), unit="B", unit_scale=True, desc=f"export {to}", disable=not progress)
    try:
        with bar:
            for name in names:
                w = _dense(ckpt, name)
                if cast is not None and w.is_floating_point():
                    w = w.to(cast)
                if w.is_floating_point():
                    zeros += int(w.numel() - torch.count_nonzero(w))
                    numel += w.numel()
                key = keys[name]
                if name in compressed:
                    structure_24 = structure_24 and is_2_4(w)
                    bt = encode_fast(w)
                    parts = {"shape": torch.tensor(list(w.shape), dtype=torch.int64), "compressed": bt.values,
                             "bitmask": bt.bitmask, "row_offsets": bt.row_offsets}
                    prefix = key.removesuffix(".weight")
                    for part in CT_PARTS:
                        writer.add(f"{prefix}.{part}", parts[part])
                else:
                    writer.add(key, w)
                bar.update(ckpt.tensors[name].dense_bytes)
                del w
            shards = writer.finish()
            cfg = _export_config(ckpt, dtype)
            if to == "compressed-tensors":
                cfg["quantization_config"] = sparsity_config(
                    targets=classes, ignore=ignore, global_sparsity=zeros / numel if numel else 0.0,
                    structure="2:4" if structure_24 and compressed else "unstructured")
            (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
            _copy_side_files(ckpt.path, tmp, meta_model)
            if out.exists():
                old = out.parent / f".{out.name}.old-{os.getpid()}"
                os.rename(out, old)
                os.rename(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, out)
    except OSError as e:
        writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno in _DISK_FULL:
            raise ExportError(f"{out}: out of disk space while exporting ({e.strerror}); nothing was written") from None
        raise
    except BaseException:
        writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    res = {"path": str(out), "to": to, "tensors": len(writer.weight_map), "bytes": writer.total, "shards": len(shards),
           "seconds": time.perf_counter() - t0}
    if to == "compressed-tensors":
        res["compressed"] = len(compressed)
    return res


def _dense(ckpt: Checkpoint, name: str) -> torch.Tensor:
    """A parameter as a dense tensor, checksums verified; bitmaps through the fast kernels (bit-exact to decode)."""
    from .format import BitmapTensor
    from .kernels import decompress

    s = ckpt.stored(name, verify=True)
    return decompress(s) if isinstance(s, BitmapTensor) else s.clone()


def _export_config(ckpt: Checkpoint, dtype: str | None) -> dict:
    cfg = dict(ckpt.config)
    cfg.pop("quantization_config", None)
    cfg.pop("compression_config", None)
    stored = {dtype_name(t.dtype) for t in ckpt.tensors.values() if t.dtype.is_floating_point}
    if dtype is not None:
        cfg["dtype"] = dtype
    elif len(stored) == 1:
        cfg["dtype"] = stored.pop()
    if "torch_dtype" in cfg and "dtype" in cfg:
        cfg["torch_dtype"] = cfg["dtype"]
    return cfg


def _copy_side_files(src: Path, dst: Path, meta_model) -> None:
    """Tokenizer files, generation config and anything else small the checkpoint carries (never its weights)."""
    for f in sorted(src.iterdir()):
        if f.is_file() and f.name not in _SKIP_FILES and f.suffix != ".safetensors" and not f.name.startswith("."):
            shutil.copy2(f, dst / f.name)
    if not (dst / "generation_config.json").exists():
        from transformers import GenerationConfig

        GenerationConfig.from_model_config(meta_model.config).save_pretrained(dst)


__all__ = ["CT_VERSION", "TARGETS", "ExportError", "ShardWriter", "export", "original_names", "sparsity_config"]
