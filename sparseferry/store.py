"""The checkpoint store: writing and reading sparseferry checkpoint folders (docs/FORMAT.md, 2-4).

Writing goes to a temporary sibling folder that is renamed into place only when complete, so an
interrupted or failed write never leaves a half checkpoint. Reading validates the manifest and the
files against it up front, then gives lazy access to any tensor (by mmap) or to a whole decoder
layer (one contiguous byte range, read into a caller's buffer, optionally bypassing the page cache).
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch
import xxhash

from .encoder import encode_fast
from .errors import SparseferryError
from .format import (
    BLOCK_COLS,
    QUANT_FORMATS,
    BitmapTensor,
    FormatError,
    QuantBitmapTensor,
    decode,
    worth_encoding,
)
from .io import FileReader
from .validate import (
    MANIFEST_DIGEST_KEY,
    MAX_LAYERS,
    ST_DTYPES,
    CheckpointError,
    check_entry,
    check_entry_fields,
    check_file_entry,
    check_layout,
    check_manifest_digest,
    is_int,
    manifest_digest,
    pad_spans,
    read_header,
    seal,
)

FORMAT_NAME = "sparseferry"
FORMAT_VERSION = 1
MANIFEST = "sparseferry.json"
EXTRA_FILE = "extra.safetensors"

_ST_DTYPES = ST_DTYPES  # torch dtype <-> safetensors dtype string
_ST_FROM = {v: k for k, v in _ST_DTYPES.items()}
_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
_DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)  # a write failed for lack of room




def layer_file(i: int) -> str:
    return f"layers/layer-{i:05d}.safetensors"


def digest(data) -> str:
    return xxhash.xxh3_64_hexdigest(data)


def dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise CheckpointError(f"unknown dtype {name!r}")
    return dt


def _as_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().contiguous().cpu()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


# ----------------------------------------------------------------------------------------------
# Encoding one parameter for storage


@dataclass
class StoredTensor:
    """One model parameter as it will be stored: dense, or the parts of its bitmap encoding."""

    name: str  # state-dict name, e.g. "model.layers.0.mlp.up_proj.weight"
    encoding: str  # "bitmap" | "dense"
    dtype: torch.dtype
    shape: tuple[int, ...]
    nnz: int
    parts: dict[str, torch.Tensor]  # part -> tensor ("dense" for dense; FORMAT.md parts for bitmap)
    # extra manifest fields of quantized values: {"values": "int8"|"int4", "group_size": G, "rel_error": e}
    meta: dict = field(default_factory=dict)
    # encoding "experts": one ordinary StoredTensor per expert (its slice along dim 0); `parts` is empty
    experts: list[StoredTensor] | None = None

    @property
    def prefix(self) -> str:
        return self.name.removesuffix(".weight")

    def stored_name(self, part: str) -> str:
        return self.name if part == "dense" else f"{self.prefix}.{part}"


def prepare(name: str, w: torch.Tensor, sparse: bool, *, values: str | None = None,
            group_size: int | None = None) -> StoredTensor:
    """Choose the storage of a parameter: bitmap when asked for and it saves bytes, else dense.

    values: None (the matrix's own float values) or "int8" / "int4": the non-zero values of a
    bitmap-encoded matrix are quantized (`quant.quantize`, groups of `group_size` non-zeros of a row,
    0 = per row, None = the format's default), and its relative reconstruction error is recorded in the manifest.
    """
    w = w.detach()
    if sparse and w.dim() == 2 and w.dtype in _DTYPE_NAMES:
        bt = encode_fast(w)
        if values is not None and values in QUANT_FORMATS:
            from .quant import quantize, relative_error

            qbt = quantize(bt, values, group_size, name=name)
            if sum(t.numel() * t.element_size() for t in qbt.parts().values()) < w.numel() * w.element_size():
                return from_bitmap(name, qbt, rel_error=relative_error(bt, qbt))
        elif worth_encoding(w.shape[0], w.shape[1], bt.nnz, w.element_size()):
            return from_bitmap(name, bt)
        return StoredTensor(name, "dense", w.dtype, tuple(w.shape), bt.nnz, {"dense": w})
    nnz = int(torch.count_nonzero(w)) if w.is_floating_point() else w.numel()
    return StoredTensor(name, "dense", w.dtype, tuple(w.shape), nnz, {"dense": w})


def expert_name(name: str, e: int) -> str:
    """The name of expert e's slice of expert parameter `name` (docs/FORMAT.md, section 2b)."""
    return f"{name.removesuffix('.weight')}.experts.{e}"


def expert_slices(w: torch.Tensor, num_experts: int) -> list[torch.Tensor]:
    """Expert e's slice of an expert parameter: the e-th of E equal contiguous pieces along dim 0
    (`w[e]` for `[E, R, C]`; rows `e*F .. (e+1)*F - 1` for DBRX's `[E * F, H]`)."""
    if w.shape[0] == num_experts:
        return list(w.unbind(0))
    if w.dim() < 2 or w.shape[0] % num_experts:
        raise CheckpointError(f"parameter of shape {list(w.shape)} does not split into {num_experts} experts along dim 0")
    return list(w.reshape(num_experts, w.shape[0] // num_experts, *w.shape[1:]).unbind(0))


def experts_shape_ok(shape: tuple[int, ...], num_experts: int, sub: tuple[int, ...]) -> bool:
    """Whether E slices of shape `sub` make up a parameter of `shape` (see `expert_slices`)."""
    return tuple(shape) == (num_experts, *sub) or (
        len(sub) >= 1 and len(shape) == len(sub) and shape[0] == num_experts * sub[0] and tuple(shape[1:]) == tuple(sub[1:]))


def prepare_experts(name: str, w, sparse: bool, *, num_experts: int | None = None, values: str | None = None,
                    group_size: int | None = None) -> StoredTensor:
    """An expert parameter stored as E ordinary tensors, one per expert (`prepare` on each slice).

    `w` is the parameter (split by `expert_slices` into `num_experts`, default its leading dim) or
    the sequence of its E slices. 2-D slices are bitmap-encoded (or quantized) when `sparse`, 1-D
    slices (per-expert biases) stay dense.
    """
    if isinstance(w, torch.Tensor):
        shape = tuple(w.shape)
        slices = expert_slices(w, num_experts or w.shape[0])
    else:
        slices = list(w)
        shape = (len(slices), *slices[0].shape) if slices else ()
    subs = [prepare(expert_name(name, e), s, sparse and s.dim() == 2, values=values, group_size=group_size)
            for e, s in enumerate(slices)]
    if not subs:
        raise CheckpointError(f"{name}: an expert parameter needs at least one expert")
    first = subs[0]
    for e, st in enumerate(subs):
        if st.shape != first.shape or st.dtype != first.dtype:
            raise CheckpointError(f"{name}: expert {e} is {list(st.shape)} {dtype_name(st.dtype)}, expert 0 is "
                                  f"{list(first.shape)} {dtype_name(first.dtype)} (every expert must have one shape and dtype)")
    return StoredTensor(name, "experts", first.dtype, shape, sum(st.nnz for st in subs), {}, experts=subs)


def from_bitmap(name: str, bt: BitmapTensor, rel_error: float | None = None) -> StoredTensor:
    """A bitmap-encoded parameter; a QuantBitmapTensor also records its value format, group size and error."""
    meta = {}
    if isinstance(bt, QuantBitmapTensor):
        meta = {"values": bt.value_format, "group_size": bt.group_size}
        if rel_error is not None:
            meta["rel_error"] = rel_error
    return StoredTensor(name, "bitmap", bt.dtype, tuple(bt.shape), bt.nnz, bt.parts(), meta)


# ----------------------------------------------------------------------------------------------
# Writing


def _block_items(tensors: list[StoredTensor]) -> list[tuple[str, str, str, torch.Tensor]]:
    """(stored name, part, owner entry name, tensor) sorted by decreasing element size, then name."""
    items = []
    for st in tensors:
        for part, t in st.parts.items():
            items.append((st.stored_name(part), part, st.name, t))
    items.sort(key=lambda it: (-it[3].element_size(), it[0]))
    return items


def _write_safetensors(path: Path, tensors: list[StoredTensor]) -> tuple[dict, dict]:
    """Write one safetensors file; returns (file entry, {entry name: {part: part entry}}).

    Layout (FORMAT.md section 2): the ordinary tensors' parts sorted by decreasing element size,
    then name; then, when some tensors are expert parameters, one block per expert holding that
    expert's parts of every expert parameter (same order inside the block), each block starting
    8-byte aligned (a U8 padding tensor `__pad__.N` fills the gap before it).
    """
    plain = [st for st in tensors if st.experts is None]
    expert = [st for st in tensors if st.experts is not None]
    num_experts = len(expert[0].experts) if expert else 0
    for st in expert:
        if len(st.experts) != num_experts:
            raise CheckpointError(f"{path.name}: {st.name} has {len(st.experts)} experts, {expert[0].name} has "
                                  f"{num_experts} (one layer's expert parameters must have one expert count)")
    blocks = [_block_items(plain)] + [_block_items([st.experts[e] for st in expert]) for e in range(num_experts)]
    header, pos, spans, npad = {}, 0, [], 0
    layout = []  # (stored name, part, owner, tensor) in file order, padding included (owner None)
    for b, items in enumerate(blocks):
        if b > 0 and pos % 8:
            pad = torch.zeros(8 - pos % 8, dtype=torch.uint8)
            layout.append((f"__pad__.{npad}", "pad", None, pad))
            header[f"__pad__.{npad}"] = {"dtype": "U8", "shape": [pad.numel()], "data_offsets": [pos, pos + pad.numel()]}
            pos += pad.numel()
            npad += 1
        start = pos
        for sname, part, owner, t in items:
            n = t.numel() * t.element_size()
            if sname in header:
                raise CheckpointError(f"{path.name}: two tensors are stored under the name {sname}")
            header[sname] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [pos, pos + n]}
            layout.append((sname, part, owner, t))
            pos += n
        spans.append((start, pos))
    header["__metadata__"] = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION)}
    hbytes = json.dumps(header, separators=(",", ":")).encode()
    hbytes += b" " * ((-len(hbytes)) % 8)  # data start 8-byte aligned
    data_start = 8 + len(hbytes)
    parts_out: dict[str, dict] = {}
    h = xxhash.xxh3_64()
    span_h = [xxhash.xxh3_64() for _ in spans]
    span_of = {}
    for b, items in enumerate(blocks):
        for sname, *_ in items:
            span_of[sname] = b
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hbytes)))
        f.write(hbytes)
        for sname, part, owner, t in layout:
            b = _as_bytes(t)
            f.write(b)
            h.update(b)
            if owner is None:
                continue
            span_h[span_of[sname]].update(b)
            off = data_start + header[sname]["data_offsets"][0]
            parts_out.setdefault(owner, {})[part] = {
                "name": sname, "dtype": dtype_name(t.dtype), "shape": list(t.shape),
                "offset": off, "nbytes": len(b), "digest": digest(b),
            }
        f.flush()
        os.fsync(f.fileno())
    size = data_start + pos
    head = struct.pack("<Q", len(hbytes)) + hbytes
    fentry = {"size": size, "data_start": data_start, "data_end": size, "digest": h.hexdigest(),
              "header_digest": digest(head)}
    if expert:
        ranges = [{"start": data_start + a, "end": data_start + z, "digest": hh.hexdigest()} for (a, z), hh in zip(spans, span_h)]
        fentry["base"], fentry["experts"] = ranges[0], ranges[1:]
    return fentry, parts_out


class CheckpointWriter:
    """Writes a checkpoint into a temporary folder; `commit()` renames it to `dst`.

    Use as a context manager: leaving the block with an exception removes the temporary folder.
    """

    def __init__(self, dst, *, config: dict, architecture: str, layers_prefix: str, num_layers: int,
                 tied: dict[str, str] | None = None, force: bool = False, extra: dict | None = None,
                 sources=()):
        from .guard import encode_floats, prepare_output

        self.dst = prepare_output(dst, force=force, sources=sources)  # never the source, only our own outputs
        self.dst.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.dst.parent / f".{self.dst.name}.partial-{os.getpid()}"
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        (self.tmp / "layers").mkdir(parents=True)
        self.manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "block_cols": BLOCK_COLS,
            "architecture": architecture,
            "config": encode_floats(config),  # standard JSON: non-finite floats as {"__float__": ...}
            "layers_prefix": layers_prefix,
            "num_layers": num_layers,
            "checksum": "xxh3_64",
            "tied": dict(tied or {}),
            "files": {},
            "tensors": {},
            **(extra or {}),
        }
        self._committed = False

    def write_file(self, relpath: str, tensors: list[StoredTensor], layer: int | None) -> None:
        path = self.tmp / relpath
        try:
            fentry, parts = _write_safetensors(path, tensors)
        except OSError as e:
            if e.errno in _DISK_FULL:
                raise self._out_of_space(relpath, e) from None
            raise
        self.manifest["files"][relpath] = fentry

        def entry(st: StoredTensor) -> dict:
            return {"file": relpath, "layer": layer, "encoding": st.encoding, "dtype": dtype_name(st.dtype),
                    "shape": list(st.shape), "nnz": st.nnz, **st.meta, "parts": parts.get(st.name, {})}

        for st in tensors:
            if st.experts is None:
                self.manifest["tensors"][st.name] = entry(st)
            else:
                self.manifest["tensors"][st.name] = {
                    "file": relpath, "layer": layer, "encoding": "experts", "dtype": dtype_name(st.dtype),
                    "shape": list(st.shape), "nnz": st.nnz, "num_experts": len(st.experts),
                    "experts": [entry(sub) for sub in st.experts],
                }

    def _out_of_space(self, what: str, e: OSError) -> CheckpointError:
        return CheckpointError(f"{self.dst}: out of disk space while writing {what} ({e.strerror}); nothing was written")

    def copy_file(self, src: Path, name: str | None = None) -> None:
        name = name or Path(src).name
        try:
            shutil.copy2(src, self.tmp / name)
        except OSError as e:
            if e.errno in _DISK_FULL:
                raise self._out_of_space(name, e) from None
            raise

    def write_config(self, name: str, config: dict) -> None:
        """Write a config dict as JSON, non-finite floats in transformers' {"__float__": ...} form."""
        from .guard import encode_floats

        self.write_text(name, json.dumps(encode_floats(config), indent=2, allow_nan=False))

    def write_text(self, name: str, text: str) -> None:
        """Write a small text file (e.g. config.json) into the checkpoint."""
        try:
            (self.tmp / name).write_text(text)
        except OSError as e:
            if e.errno in _DISK_FULL:
                raise self._out_of_space(name, e) from None
            raise

    def commit(self) -> Path:
        mpath = self.tmp / MANIFEST
        seal(self.manifest)
        try:
            with open(mpath, "w") as f:
                json.dump(self.manifest, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            if not (self.tmp / "config.json").exists():
                (self.tmp / "config.json").write_text(json.dumps(self.manifest["config"], indent=2, allow_nan=False))
        except OSError as e:
            if e.errno in _DISK_FULL:
                raise self._out_of_space(MANIFEST, e) from None
            raise
        if self.dst.exists():  # force: replace only now that the new one is complete
            old = self.dst.parent / f".{self.dst.name}.old-{os.getpid()}"
            os.rename(self.dst, old)
            os.rename(self.tmp, self.dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(self.tmp, self.dst)
        self._committed = True
        return self.dst

    def abort(self) -> None:
        if not self._committed:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
            if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
                # a caller's own write into self.tmp (e.g. an extra file) ran out of room
                raise self._out_of_space(Path(exc.filename).name if exc.filename else "the checkpoint", exc) from None


# ----------------------------------------------------------------------------------------------
# Reading


@dataclass
class TensorEntry:
    name: str
    file: str
    layer: int | None
    encoding: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    nnz: int
    parts: dict[str, dict]
    values: str | None = None  # quantized value format ("int8" / "int4"); None: values in `dtype`
    group_size: int | None = None  # of quantized values (0: one group per row)
    rel_error: float | None = None  # ||W - dequantized W|| / ||W||, recorded at convert time
    experts: list[TensorEntry] | None = None  # encoding "experts": one ordinary entry per expert

    @property
    def num_experts(self) -> int:
        return len(self.experts) if self.experts is not None else 0

    @property
    def stored_bytes(self) -> int:
        if self.experts is not None:
            return sum(sub.stored_bytes for sub in self.experts)
        return sum(p["nbytes"] for p in self.parts.values())

    @property
    def dense_bytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * self.dtype.itemsize

    @property
    def sparsity(self) -> float:
        n = self.dense_bytes // self.dtype.itemsize
        return 1.0 - self.nnz / n if n else 0.0


def _view(buf: torch.Tensor, base: int, p: dict) -> torch.Tensor:
    """A typed view of part `p` inside `buf`, which holds the file's bytes from offset `base`."""
    start = p["offset"] - base
    raw = buf[start : start + p["nbytes"]]
    dt = dtype_from_name(p["dtype"])
    return raw.view(dt).reshape(p["shape"]) if p["nbytes"] else torch.empty(p["shape"], dtype=dt)


class Checkpoint:
    """A sparseferry checkpoint folder, opened lazily. See `open_checkpoint`."""

    def __init__(self, path):
        self.path = Path(path)
        mpath = self.path / MANIFEST
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: no such folder")
        if not mpath.is_file():
            hint = " (this is a HuggingFace model folder: run `sparseferry convert` on it first)" if (self.path / "config.json").exists() else ""
            raise CheckpointError(f"{self.path}: not a sparseferry checkpoint, no {MANIFEST}{hint}")
        try:
            m = json.loads(mpath.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{mpath}: not valid JSON ({e})") from None
        if not isinstance(m, dict) or m.get("format") != FORMAT_NAME:
            raise CheckpointError(f"{mpath}: not a sparseferry manifest (format={m.get('format') if isinstance(m, dict) else None!r})")
        v = m.get("format_version")
        if not isinstance(v, int) or v > FORMAT_VERSION:
            raise CheckpointError(f"{mpath}: format version {v!r} is newer than this sparseferry reads ({FORMAT_VERSION}); upgrade sparseferry")
        for k in ("config", "files", "tensors", "num_layers", "layers_prefix", "block_cols"):
            if k not in m:
                raise CheckpointError(f"{mpath}: manifest lacks {k!r}")
        if m["block_cols"] != BLOCK_COLS:
            raise CheckpointError(f"{mpath}: block_cols {m['block_cols']} unsupported (expected {BLOCK_COLS})")
        check_manifest_digest(mpath, m)
        if m.get("checksum", "xxh3_64") != "xxh3_64":
            raise CheckpointError(f"{mpath}: checksum {m.get('checksum')!r} unsupported (this sparseferry reads xxh3_64)")
        if not is_int(m["num_layers"], 0, MAX_LAYERS) or not isinstance(m["layers_prefix"], str) \
                or not isinstance(m["files"], dict) or not isinstance(m["tensors"], dict) or not isinstance(m["config"], dict) \
                or not isinstance(m.get("tied", {}), dict):
            raise CheckpointError(f"{mpath}: num_layers must be an integer in [0, {MAX_LAYERS}], layers_prefix a string, "
                                  f"config, files, tensors and tied objects")
        from .guard import decode_floats

        self.manifest = m
        self.config: dict = decode_floats(m["config"])
        self.num_layers: int = m["num_layers"]
        self.layers_prefix: str = m["layers_prefix"]
        self.tied: dict[str, str] = m.get("tied", {})
        self.files: dict[str, dict] = m["files"]
        headers = {}
        for rel, fe in self.files.items():
            fp = self._file_path(mpath, rel)
            check_file_entry(mpath, rel, fe, fp.stat().st_size)
            headers[rel] = read_header(fp, fe)
        for i in range(self.num_layers):
            if layer_file(i) not in self.files:
                raise CheckpointError(f"{mpath}: layer {i} has no file {layer_file(i)} in the manifest")
        self.tensors: dict[str, TensorEntry] = {}
        for name, e in m["tensors"].items():
            where = f"{mpath}: tensor {name}"
            if not isinstance(e, dict):
                raise CheckpointError(f"{where}: entry is not an object")
            if e.get("encoding") == "experts":  # the sub-entries are ordinary entries, checked one by one
                for k, sub in enumerate(e.get("experts") or []):
                    check_entry_fields(f"{where}, expert {k}", sub)
            else:
                check_entry_fields(where, e)
            where_file = e.get("file")
            if where_file not in self.files:
                raise CheckpointError(f"{mpath}: tensor {name} lives in {where_file!r}, which the manifest does not list")
            layer = e.get("layer")
            if layer is None:
                if where_file.startswith("layers/"):
                    raise CheckpointError(f"{mpath}: tensor {name} is outside the decoder layers but stored in {where_file}")
            elif not is_int(layer, 0, self.num_layers - 1) or where_file != layer_file(layer) \
                    or not name.startswith(f"{self.layers_prefix}.{layer}."):
                raise CheckpointError(f"{mpath}: tensor {name} says layer {layer!r} in {where_file}; expected a layer in "
                                      f"[0, {self.num_layers}) whose file and name prefix ({self.layers_prefix}.N.) it matches")
            self.tensors[name] = _parse_entry(mpath, name, e, self.files)
        for name, t in self.tensors.items():
            for sub in t.experts if t.experts is not None else [t]:
                _check_value_encoding(mpath, sub)
        for rel, fe in self.files.items():
            fp = self.path / rel
            spans = []
            for name, t in self.tensors.items():
                if t.file != rel:
                    continue
                if t.experts is None:
                    spans += check_entry(fp, fe, headers[rel], name, m["tensors"][name])
                else:
                    for k, sub in enumerate(t.experts):
                        spans += check_entry(fp, fe, headers[rel], sub.name, m["tensors"][name]["experts"][k])
            check_layout(fp, headers[rel], spans + pad_spans(fp, fe, headers[rel]))
        self._layer_names: dict[int, list[str]] = {}
        for name, t in self.tensors.items():
            if t.layer is not None:
                self._layer_names.setdefault(t.layer, []).append(name)
        self._check_expert_layout(mpath)
        self._mmaps: dict[str, object] = {}

    def _file_path(self, mpath: Path, rel) -> Path:
        """A file the manifest lists: a regular file inside the checkpoint folder (no `..`, no link out)."""
        fp = self.path / rel if isinstance(rel, str) else None
        if fp is None or Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise CheckpointError(f"{mpath}: file name {rel!r} is not a path inside the checkpoint")
        if not fp.exists():
            raise CheckpointError(f"{fp}: listed in the manifest but missing")
        if not fp.is_file() or not fp.resolve().is_relative_to(self.path.resolve()):
            raise CheckpointError(f"{fp}: not a regular file inside the checkpoint folder")
        return fp

    # -- structure
    def layer_tensors(self, i: int) -> list[str]:
        return self._layer_names.get(i, [])

    def layer_file(self, i: int) -> str:
        return layer_file(i)

    def layer_range(self, i: int) -> tuple[Path, int, int]:
        """(file, start, end) of the contiguous bytes holding all of layer i's tensors."""
        fe = self.files[layer_file(i)]
        return self.path / layer_file(i), fe["data_start"], fe["data_end"]

    def non_layer_tensors(self) -> list[str]:
        return [n for n, t in self.tensors.items() if t.layer is None]

    # -- experts (docs/FORMAT.md, section 2b): the layer's base range, then one range per expert
    def num_experts(self, i: int) -> int:
        """Experts of layer i (0 for a layer without expert parameters)."""
        return len(self.files[layer_file(i)].get("experts", ()))

    def expert_params(self, i: int) -> list[str]:
        """Names of layer i's expert parameters (encoding "experts"), in manifest order."""
        return [n for n in self.layer_tensors(i) if self.tensors[n].experts is not None]

    def base_params(self, i: int) -> list[str]:
        """Names of layer i's other parameters (those in its base range)."""
        return [n for n in self.layer_tensors(i) if self.tensors[n].experts is None]

    def base_range(self, i: int) -> tuple[Path, int, int]:
        """(file, start, end) of layer i's non-expert tensors (the whole layer when it has no experts)."""
        fe = self.files[layer_file(i)]
        r = fe.get("base")
        return (self.path / layer_file(i), r["start"], r["end"]) if r else self.layer_range(i)

    def expert_range(self, i: int, e: int) -> tuple[Path, int, int]:
        """(file, start, end) of expert e of layer i: its slice of every expert parameter of the layer."""
        r = self._expert_span(i, e)
        return self.path / layer_file(i), r["start"], r["end"]

    def base_bytes(self, i: int) -> int:
        _, a, z = self.base_range(i)
        return z - a

    def expert_bytes(self, i: int, e: int) -> int:
        _, a, z = self.expert_range(i, e)
        return z - a

    def _expert_span(self, i: int, e: int) -> dict:
        spans = self.files[layer_file(i)].get("experts", [])
        if not isinstance(e, int) or not 0 <= e < len(spans):
            raise CheckpointError(f"{self.path / layer_file(i)}: no expert {e!r} in layer {i} ({len(spans)} experts)")
        return spans[e]

    def _check_expert_layout(self, mpath: Path) -> None:
        """Expert entries and the file ranges agree: one expert count per layer, every part inside its range."""
        for i in range(self.num_layers):
            rel = layer_file(i)
            if rel not in self.files:
                continue
            fe = self.files[rel]
            names = self.expert_params(i)
            spans = fe.get("experts")
            if not names and spans is None and "base" not in fe:
                continue
            if not names or not isinstance(spans, list) or not isinstance(fe.get("base"), dict):
                raise CheckpointError(f"{mpath}: file {rel}: expert parameters and the file's base/experts ranges "
                                      f"do not go together ({len(names)} expert parameters)")
            ranges = [fe["base"], *spans]
            for r in ranges:
                if not isinstance(r, dict) or not all(isinstance(r.get(k), int) for k in ("start", "end")) \
                        or not isinstance(r.get("digest"), str) \
                        or not fe["data_start"] <= r["start"] <= r["end"] <= fe["data_end"]:
                    raise CheckpointError(f"{mpath}: file {rel}: malformed byte range {r!r}")
            for n in names:
                t = self.tensors[n]
                if t.num_experts != len(spans):
                    raise CheckpointError(f"{mpath}: tensor {n} has {t.num_experts} experts, file {rel} has {len(spans)} expert ranges")
                for e, sub in enumerate(t.experts):
                    _check_inside(mpath, sub, spans[e], f"expert {e} of layer {i}")
            for n in self.base_params(i):
                _check_inside(mpath, self.tensors[n], fe["base"], f"the base range of layer {i}")

    def stored_bytes(self, names=None) -> int:
        return sum(self.tensors[n].stored_bytes for n in (names if names is not None else self.tensors))

    def dense_bytes(self, names=None) -> int:
        return sum(self.tensors[n].dense_bytes for n in (names if names is not None else self.tensors))

    # -- lazy access by mmap
    def _mmap(self, rel: str) -> torch.Tensor:
        t = self._mmaps.get(rel)
        if t is None:
            import warnings

            import numpy as np

            arr = np.memmap(self.path / rel, dtype=np.uint8, mode="r")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # read-only mmap: we never write through it
                t = torch.from_numpy(arr) if arr.size else torch.empty(0, dtype=torch.uint8)
            self._mmaps[rel] = t
        return t

    def stored(self, name: str, verify: bool = False):
        """The stored form of a parameter: a dense tensor or a BitmapTensor (views of an mmap; copy before writing)."""
        e = self._entry(name)
        if e.experts is not None:
            return [self._stored_entry(sub, verify) for sub in e.experts]
        return self._stored_entry(e, verify)

    def _stored_entry(self, e: TensorEntry, verify: bool):
        name = e.name
        buf = self._mmap(e.file)
        parts = {k: _view(buf, 0, p) for k, p in e.parts.items()}
        if verify:
            for k, p in e.parts.items():
                if digest(_as_bytes(parts[k])) != p["digest"]:
                    raise CheckpointError(f"{self.path / e.file}: checksum mismatch in {p['name']} (tensor {name})")
        return self._assemble(e, parts)

    def _assemble(self, e: TensorEntry, parts: dict[str, torch.Tensor]):
        if e.encoding == "dense":
            return parts["dense"]
        try:
            if e.values in QUANT_FORMATS:
                bt = QuantBitmapTensor.from_parts(parts, e.name.removesuffix(".weight"), value_format=e.values,
                                                  group_size=e.group_size, out_dtype=e.dtype, nnz=e.nnz)
            else:
                bt = BitmapTensor.from_parts(parts, e.name.removesuffix(".weight"))
        except FormatError as err:
            raise CheckpointError(f"{self.path / e.file}: {err}") from None
        if bt.nnz != e.nnz or tuple(bt.shape) != e.shape:
            raise CheckpointError(f"{self.path / e.file}: {e.name} stores {bt.nnz} values of {list(bt.shape)}, manifest says {e.nnz} of {list(e.shape)}")
        return bt

    def load(self, name: str, device="cpu", verify: bool = False) -> torch.Tensor:
        """A parameter as a dense tensor (decoded with the reference decoder), a fresh copy."""
        s = self.stored(name, verify=verify)
        if isinstance(s, list):  # an expert parameter: its experts' slices, stacked
            e = self.tensors[name]
            return torch.stack([decode(x, device=device) if isinstance(x, BitmapTensor) else x.to(device)
                                for x in s]).reshape(e.shape)
        if isinstance(s, BitmapTensor):
            return decode(s, device=device)
        return s.to(device, copy=True)

    def _entry(self, name: str) -> TensorEntry:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor {name!r} in this checkpoint") from None

    # -- whole layers by direct reads
    def open_reader(self, i: int, direct: bool = True) -> FileReader:
        return FileReader(self.layer_range(i)[0], direct=direct)

    def read_layer(self, i: int, buf: torch.Tensor, reader: FileReader | None = None, direct: bool = True,
                   verify: bool = True) -> dict:
        """Read layer i's bytes into `buf` (see io.buffer_size_for) and return {name: stored form} as views.

        With verify, the layer's digest is checked first and a mismatch raises CheckpointError
        naming the layer and the corrupt tensor: nothing is ever computed on corrupt weights.
        """
        path, start, end = self.layer_range(i)
        own = reader is None
        reader = reader or FileReader(path, direct=direct)
        try:
            data = reader.read_range(start, end, buf)
        finally:
            if own:
                reader.close()
        return self.layer_views(i, data, verify=verify)

    def layer_views(self, i: int, data: torch.Tensor, verify: bool = True) -> dict:
        """{name: stored form} as views of `data`, which holds layer i's file bytes [data_start, data_end)."""
        rel = layer_file(i)
        fe = self.files[rel]
        if verify and digest(_as_bytes(data)) != fe["digest"]:
            bad = self._find_corrupt(i, data)
            raise CheckpointError(f"{self.path / rel}: checksum mismatch in layer {i}{bad}: refusing to compute on corrupt weights")
        out = {}
        for name in self.layer_tensors(i):
            e = self.tensors[name]
            if e.experts is not None:  # an expert parameter: one stored form per expert
                out[name] = [self._assemble(sub, {k: _view(data, fe["data_start"], p) for k, p in sub.parts.items()})
                             for sub in e.experts]
            else:
                out[name] = self._assemble(e, {k: _view(data, fe["data_start"], p) for k, p in e.parts.items()})
        return out

    def _find_corrupt(self, i: int, data: torch.Tensor, base: int | None = None, entries=None) -> str:
        fe = self.files[layer_file(i)]
        base = fe["data_start"] if base is None else base
        if entries is None:
            entries = [sub for n in self.layer_tensors(i) for sub in (self.tensors[n].experts or [self.tensors[n]])]
        for e in entries:
            for p in e.parts.values():
                if digest(_as_bytes(_view(data, base, p))) != p["digest"]:
                    return f" (tensor {p['name']})"
        return ""

    # -- one layer's base, or one expert, by direct reads (docs/FORMAT.md, section 2b)
    def read_base(self, i: int, buf: torch.Tensor, reader: FileReader | None = None, direct: bool = True) -> torch.Tensor:
        """Read layer i's base range (its non-expert tensors) into `buf`; the range's digest is verified.

        Returns the uint8 view of those bytes, for `base_views`. Without expert parameters the base
        range is the whole layer.
        """
        path, start, end = self.base_range(i)
        r = self.files[layer_file(i)].get("base")
        want = r["digest"] if r else self.files[layer_file(i)]["digest"]
        data = self._read(path, start, end, buf, reader, direct)
        if digest(_as_bytes(data)) != want:
            bad = self._find_corrupt(i, data, start, [self.tensors[n] for n in self.base_params(i)])
            raise CheckpointError(f"{path}: checksum mismatch in the base of layer {i}{bad}: refusing to compute on corrupt weights")
        return data

    def read_expert(self, i: int, e: int, buf: torch.Tensor, reader: FileReader | None = None,
                    direct: bool = True) -> torch.Tensor:
        """Read expert e of layer i (one contiguous range) into `buf`; its digest is verified.

        Returns the uint8 view of those bytes, for `expert_views`.
        """
        span = self._expert_span(i, e)
        path, start, end = self.expert_range(i, e)
        data = self._read(path, start, end, buf, reader, direct)
        if digest(_as_bytes(data)) != span["digest"]:
            bad = self._find_corrupt(i, data, start, [self.tensors[n].experts[e] for n in self.expert_params(i)])
            raise CheckpointError(f"{path}: checksum mismatch in expert {e} of layer {i}{bad}: refusing to compute on corrupt weights")
        return data

    def _read(self, path, start, end, buf, reader, direct) -> torch.Tensor:
        own = reader is None
        reader = reader or FileReader(path, direct=direct)
        try:
            return reader.read_range(start, end, buf)
        finally:
            if own:
                reader.close()

    def base_views(self, i: int, data: torch.Tensor) -> dict:
        """{name: stored form} of layer i's non-expert parameters, as views of `data` (from `read_base`)."""
        start = self.base_range(i)[1]
        return {n: self._assemble(self.tensors[n], {k: _view(data, start, p) for k, p in self.tensors[n].parts.items()})
                for n in self.base_params(i)}

    def expert_views(self, i: int, e: int, data: torch.Tensor) -> dict:
        """{expert parameter name: expert e's slice, stored form} as views of `data` (from `read_expert`)."""
        start = self.expert_range(i, e)[1]
        out = {}
        for n in self.expert_params(i):
            sub = self.tensors[n].experts[e]
            out[n] = self._assemble(sub, {k: _view(data, start, p) for k, p in sub.parts.items()})
        return out

    # -- verification
    def verify(self, progress=None) -> None:
        """Check every file's digest and every encoded tensor's consistency; raise CheckpointError on the first problem."""
        import safetensors

        for rel, fe in self.files.items():
            fp = self.path / rel
            buf = self._mmap(rel)
            if digest(_as_bytes(buf[fe["data_start"] : fe["data_end"]])) != fe["digest"]:
                names = [n for n, t in self.tensors.items() if t.file == rel]
                for n in names:
                    self.stored(n, verify=True)  # raises with the tensor name
                raise CheckpointError(f"{fp}: checksum mismatch")
            try:
                with safetensors.safe_open(fp, framework="pt") as f:
                    f.keys()
                header = _read_header(fp)
            except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
                raise CheckpointError(f"{fp}: not a valid safetensors file ({e})") from None
            for n, t in self._entries_in(rel):
                for p in t.parts.values():
                    h = header.get(p["name"])
                    if h is None:
                        raise CheckpointError(f"{fp}: tensor {p['name']} listed in the manifest is not in the file")
                    want = {"dtype": _ST_DTYPES.get(dtype_from_name(p["dtype"])), "shape": list(p["shape"]),
                            "data_offsets": [p["offset"] - fe["data_start"], p["offset"] - fe["data_start"] + p["nbytes"]]}
                    got = {k: h.get(k) for k in want}
                    if got != want:
                        raise CheckpointError(f"{fp}: tensor {p['name']} is {got} in the file header, manifest says {want}")
                s = self._stored_entry(t, False)
                if isinstance(s, BitmapTensor):  # what the runtime's decoders check, checked up front
                    from .format import check_row_spans

                    try:
                        check_row_spans(s, blocks=True)
                    except FormatError as err:
                        raise CheckpointError(f"{fp}: tensor {n}: {err}") from None
            for k, r in enumerate([fe["base"], *fe["experts"]] if "experts" in fe else []):
                if digest(_as_bytes(buf[r["start"] : r["end"]])) != r["digest"]:
                    what = "base range" if k == 0 else f"expert {k - 1} range"
                    raise CheckpointError(f"{fp}: checksum mismatch in the {what}")
            if progress is not None:
                progress(rel)

    def _entries_in(self, rel: str):
        """(name, ordinary entry) of every stored tensor of file `rel`, expert slices included."""
        for n, t in self.tensors.items():
            if t.file == rel:
                for sub in t.experts if t.experts is not None else [t]:
                    yield sub.name, sub


def _parse_entry(mpath: Path, name: str, e, files: dict, sub: bool = False) -> TensorEntry:
    """A manifest tensor entry; an "experts" entry's sub-entries are ordinary entries, parsed alike."""
    try:
        if e["file"] not in files:
            raise CheckpointError(f"{mpath}: tensor {name} lives in {e['file']}, which the manifest does not list")
        if e["encoding"] == "experts" and not sub:
            subs = e["experts"]
            if not isinstance(subs, list) or not subs or e.get("num_experts") != len(subs):
                raise CheckpointError(f"{mpath}: tensor {name}: expected num_experts = the length of a non-empty "
                                      f"experts list, got {e.get('num_experts')!r} and {type(subs).__name__}")
            experts = [_parse_entry(mpath, expert_name(name, k), s, files, sub=True) for k, s in enumerate(subs)]
            shape, dtype = tuple(e["shape"]), dtype_from_name(e["dtype"])
            for k, x in enumerate(experts):
                if x.file != e["file"] or x.layer != e["layer"] or x.dtype != dtype or x.shape != experts[0].shape \
                        or not experts_shape_ok(shape, len(subs), x.shape):
                    raise CheckpointError(f"{mpath}: tensor {name}: expert {k} is {list(x.shape)} {dtype_name(x.dtype)} in "
                                          f"{x.file}, expected one of {len(subs)} equal pieces of {list(shape)} "
                                          f"{dtype_name(dtype)} in {e['file']}")
            if e["nnz"] != sum(x.nnz for x in experts):
                raise CheckpointError(f"{mpath}: tensor {name}: nnz {e['nnz']} is not the sum of its experts' nnz")
            return TensorEntry(name, e["file"], e["layer"], "experts", dtype, shape, e["nnz"], {}, experts=experts)
        entry = TensorEntry(name, e["file"], e["layer"], e["encoding"], dtype_from_name(e["dtype"]),
                            tuple(e["shape"]), e["nnz"], e["parts"], e.get("values"), e.get("group_size"),
                            e.get("rel_error"))
        if entry.encoding == "experts":
            raise CheckpointError(f"{mpath}: tensor {name}: an expert slice cannot itself hold experts")
        return entry
    except (KeyError, TypeError) as err:
        raise CheckpointError(f"{mpath}: malformed entry for tensor {name} ({type(err).__name__}: {err})") from None


def _check_inside(mpath: Path, t: TensorEntry, r: dict, what: str) -> None:
    for p in t.parts.values():
        if not (isinstance(p.get("offset"), int) and isinstance(p.get("nbytes"), int)
                and r["start"] <= p["offset"] and p["offset"] + p["nbytes"] <= r["end"]):
            raise CheckpointError(f"{mpath}: tensor {p.get('name', t.name)} lies outside {what} "
                                  f"[{r['start']}, {r['end']})")


def _check_value_encoding(mpath: Path, t: TensorEntry) -> None:
    """Reject encodings and value formats this reader does not know, naming the tensor."""
    if t.encoding not in ("dense", "bitmap"):
        raise CheckpointError(f"{mpath}: tensor {t.name} has unknown encoding {t.encoding!r} (this sparseferry reads "
                              f"'dense' and 'bitmap'); upgrade sparseferry")
    if t.values is None or t.encoding == "dense":
        return
    if t.values not in QUANT_FORMATS and t.values != dtype_name(t.dtype):
        raise CheckpointError(f"{mpath}: tensor {t.name} has unknown value encoding {t.values!r} (this sparseferry reads "
                              f"{', '.join(QUANT_FORMATS)} or values in the tensor's dtype); upgrade sparseferry")
    if t.values in QUANT_FORMATS and (not isinstance(t.group_size, int) or t.group_size < 0):
        raise CheckpointError(f"{mpath}: tensor {t.name}: {t.values} values need a non-negative integer group_size, "
                              f"got {t.group_size!r}")


def _read_header(path: Path) -> dict:
    """The JSON header of a safetensors file."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n))


def open_checkpoint(path) -> Checkpoint:
    """Open a sparseferry checkpoint folder (validates the manifest and file sizes; reads no weights).

    Example:
        ckpt = sparseferry.open_checkpoint("llama-sparse")
        w = ckpt.load("model.layers.0.mlp.up_proj.weight")      # dense, decoded
        bt = ckpt.stored("model.layers.0.mlp.up_proj.weight")    # BitmapTensor (mmap views)
    """
    return Checkpoint(path)
