"""A checkpoint checked against its own bytes before anything is computed on it (docs/FORMAT.md, 4).

Every field of `sparseferry.json` is untrusted. `open_checkpoint` runs, for each file, one small
read (the safetensors header) and then checks every part of every tensor without touching the data:

    manifest  the digest of the manifest itself (`manifest_digest`), field types and ranges
    file      8-byte length + JSON header exactly up to `data_start`, header digest, data_end = size
    part      dtype and shape the tensor's encoding prescribes, nbytes = prod(shape) * itemsize,
              inside [data_start, data_end), aligned to its element size, named `P.<part>`,
              identical to the header's entry (dtype, shape, data_offsets)
    file      no two parts overlap; every tensor in the header is a part of exactly one manifest entry

What the bytes *say* (row offsets against the bitmask, set bits against nnz, scale counts) is checked
where they are decoded: by every decoder path (`format.check_row_spans`, the native kernels) and by
`verify`. Validation is per ordinary tensor entry (`entry_parts`) so that container entries can
apply it to each of their sub-entries.
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import torch
import xxhash

from .errors import SparseferryError
from .format import BLOCK_COLS, QUANT_FORMATS, SCALE_DTYPE, VALUE_DTYPES

MAX_HEADER_BYTES = 100 << 20  # the safetensors reference implementation's own limit
MAX_LAYERS = 4096  # more decoder layers than any model has: a forged count, refused before any work
MANIFEST_DIGEST_KEY = "manifest_digest"

# safetensors dtype strings of the dtypes a checkpoint may hold
ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}
_BY_NAME = {str(dt).removeprefix("torch."): dt for dt in ST_DTYPES}


class CheckpointError(SparseferryError):
    """A checkpoint folder is missing, malformed, corrupted, from an unknown version, or contradicts its own bytes."""


def manifest_digest(m: dict) -> str:
    """xxh3_64 of the manifest's canonical JSON (sorted keys, no spaces), without `manifest_digest`."""
    body = {k: v for k, v in m.items() if k != MANIFEST_DIGEST_KEY}
    return xxhash.xxh3_64_hexdigest(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def seal(m: dict) -> dict:
    """Record the manifest's own digest in it (the writer's last step); returns m."""
    m[MANIFEST_DIGEST_KEY] = manifest_digest(m)
    return m


def check_manifest_digest(mpath: Path, m: dict) -> None:
    want = m.get(MANIFEST_DIGEST_KEY)
    if not isinstance(want, str):
        raise CheckpointError(f"{mpath}: manifest has no {MANIFEST_DIGEST_KEY!r} (written by an older sparseferry, "
                              f"or edited): convert the model again")
    got = manifest_digest(m)
    if got != want:
        raise CheckpointError(f"{mpath}: manifest digest mismatch ({got}, recorded {want}): the manifest was "
                              f"modified after it was written")


def is_int(v, lo: int = 0, hi: int | None = None) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo and (hi is None or v <= hi)


def dtype_of(name, where: str) -> torch.dtype:
    dt = _BY_NAME.get(name) if isinstance(name, str) else None
    if dt is None:
        raise CheckpointError(f"{where}: dtype {name!r} is not one a checkpoint holds ({', '.join(_BY_NAME)})")
    return dt


def check_shape(shape, where: str) -> tuple[int, ...]:
    if not isinstance(shape, list) or len(shape) > 8 or not all(is_int(s) for s in shape):
        raise CheckpointError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    return tuple(shape)


# ----------------------------------------------------------------------------------------------
# One file: header


def check_file_entry(mpath: Path, rel: str, fe, size: int) -> None:
    """The manifest's entry of one file against the file's size on disk."""
    if not isinstance(fe, dict) or not all(k in fe for k in ("size", "data_start", "data_end", "digest", "header_digest")):
        raise CheckpointError(f"{mpath}: malformed entry for file {rel} (needs size, data_start, data_end, digest, header_digest)")
    if not all(is_int(fe[k]) for k in ("size", "data_start", "data_end")) or not isinstance(fe["digest"], str):
        raise CheckpointError(f"{mpath}: entry for file {rel}: size/data_start/data_end must be non-negative integers")
    if size != fe["size"]:
        raise CheckpointError(f"{mpath.parent / rel}: {size} bytes, manifest says {fe['size']} (truncated or modified)")
    if not (8 < fe["data_start"] <= fe["data_end"] == size) or fe["data_start"] % 8:
        raise CheckpointError(f"{mpath.parent / rel}: data range [{fe['data_start']}, {fe['data_end']}) in the manifest "
                              f"is not an 8-byte aligned range after a header ending at the file's end ({size})")


def read_header(path: Path, fe: dict) -> dict:
    """The safetensors header of `path` (one read of data_start bytes), checked against the file entry."""
    with open(path, "rb") as f:
        raw = f.read(fe["data_start"])
    if len(raw) != fe["data_start"]:
        raise CheckpointError(f"{path}: shorter than its header ({len(raw)} of {fe['data_start']} bytes)")
    n = struct.unpack("<Q", raw[:8])[0]
    if 8 + n != fe["data_start"] or n > MAX_HEADER_BYTES:
        raise CheckpointError(f"{path}: safetensors header length {n} disagrees with the manifest's data_start "
                              f"{fe['data_start']} (expected {fe['data_start'] - 8})")
    if xxhash.xxh3_64_hexdigest(raw) != fe["header_digest"]:
        raise CheckpointError(f"{path}: header digest mismatch: the safetensors header was modified")
    try:
        header = json.loads(raw[8:])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object")
    return header


# ----------------------------------------------------------------------------------------------
# One ordinary tensor entry: the parts its encoding prescribes


def entry_parts(name: str, e: dict) -> dict[str, tuple[torch.dtype, tuple[int, ...] | None, str]]:
    """{part: (dtype, shape or None when only its rank is fixed, stored name)} an entry must have.

    `e` is one ordinary manifest tensor entry (encoding "dense" or "bitmap"); its dtype, shape, nnz,
    values and group_size have been type-checked by `check_entry_fields`. Optional parts (a
    block_offsets of a one-block row) are in the result; `check_entry` accepts their absence.
    """
    dt, shape, nnz = _BY_NAME[e["dtype"]], tuple(e["shape"]), e["nnz"]
    if e["encoding"] == "dense":
        return {"dense": (dt, shape, name)}
    rows, cols = shape
    prefix = name.removesuffix(".weight")
    want = {"shape": (torch.int64, (2,)), "bitmask": (torch.uint8, (rows, (cols + 7) // 8)),
            "row_offsets": (torch.int64, (rows,)),
            "block_offsets": (torch.int32, (rows, (cols + BLOCK_COLS - 1) // BLOCK_COLS))}
    values = e.get("values")
    if values in QUANT_FORMATS:
        want["codes"] = (torch.uint8, ((nnz + 1) // 2,)) if values == "int4" else (torch.int8, (nnz,))
        want["scales"] = (SCALE_DTYPE, None)
        if values == "int4":
            want["zeros"] = (torch.uint8, None)
    else:
        want["compressed"] = (dt, (nnz,))
    return {k: (d, s, f"{prefix}.{k}") for k, (d, s) in want.items()}


OPTIONAL_PARTS = ("block_offsets",)


def check_entry_fields(where: str, e) -> None:
    """Types and ranges of one ordinary tensor entry's own fields (not its parts' placement)."""
    if not isinstance(e, dict):
        raise CheckpointError(f"{where}: entry is not an object")
    for k in ("encoding", "dtype", "shape", "nnz", "parts"):
        if k not in e:
            raise CheckpointError(f"{where}: entry lacks {k!r}")
    if e["encoding"] not in ("dense", "bitmap"):
        return  # named by the caller (unknown encoding: upgrade sparseferry)
    dt = dtype_of(e["dtype"], where)
    shape = check_shape(e["shape"], where)
    numel = math.prod(shape)
    if not is_int(e["nnz"], 0, numel):
        raise CheckpointError(f"{where}: nnz {e['nnz']!r} is not an integer in [0, {numel}]")
    if not isinstance(e["parts"], dict):
        raise CheckpointError(f"{where}: parts is not an object")
    if e["encoding"] == "bitmap":
        if len(shape) != 2 or dt not in VALUE_DTYPES:
            raise CheckpointError(f"{where}: a bitmap-encoded tensor must be a 2-D bf16/fp16/fp32 matrix, "
                                  f"manifest says {e['dtype']} {list(shape)}")
        gs = e.get("group_size")
        if e.get("values") in QUANT_FORMATS and not is_int(gs):
            raise CheckpointError(f"{where}: {e['values']} values need a non-negative integer group_size, got {gs!r}")


def check_entry(fp: Path, fe: dict, header: dict, name: str, e: dict) -> list[tuple[int, int, str]]:
    """Check every part of one ordinary tensor entry against the file; returns their (start, end, stored name)."""
    want = entry_parts(name, e)
    parts = e["parts"]
    unknown = sorted(set(parts) - set(want))
    missing = sorted(k for k in want if k not in parts and k not in OPTIONAL_PARTS)
    if unknown or missing:
        raise CheckpointError(f"{fp}: tensor {name} ({e['encoding']}{', ' + e['values'] if e.get('values') else ''}) "
                              f"has parts {sorted(parts)}, expected {sorted(want)}"
                              + (f" (missing {', '.join(missing)})" if missing else ""))
    spans = []
    for key, p in parts.items():
        dt, shape, sname = want[key]
        spans.append(check_part(fp, fe, header, name, key, p, dt, shape, sname))
    # the exact group count needs row_offsets (checked when the tensor is assembled); a group holds >= 1 value
    if "scales" in parts and parts["scales"]["shape"][0] > e["nnz"]:
        raise CheckpointError(f"{fp}: tensor {name}: {parts['scales']['shape'][0]} scales for {e['nnz']} values "
                              f"(every group holds at least one value)")
    if "zeros" in parts and parts["zeros"]["shape"] != parts["scales"]["shape"]:
        raise CheckpointError(f"{fp}: tensor {name}: zeros {parts['zeros']['shape']} and scales "
                              f"{parts['scales']['shape']} must have one entry per group each")
    return spans


def check_part(fp: Path, fe: dict, header: dict, name: str, key: str, p, dt: torch.dtype,
               shape: tuple[int, ...] | None, sname: str) -> tuple[int, int, str]:
    """One part: its fields, its byte range inside the data, and the header's entry of it."""
    where = f"{fp}: tensor {name}, part {key}"
    if not isinstance(p, dict) or not all(k in p for k in ("name", "dtype", "shape", "offset", "nbytes")):
        raise CheckpointError(f"{where}: malformed part entry (needs name, dtype, shape, offset, nbytes)")
    if p["name"] != sname:
        raise CheckpointError(f"{where}: stored under {p['name']!r}, expected {sname!r} (a part of another tensor?)")
    got_dt = dtype_of(p["dtype"], where)
    got_shape = check_shape(p["shape"], where)
    if got_dt != dt or (shape is not None and got_shape != shape) or (shape is None and len(got_shape) != 1):
        exp = f"{str(dt).removeprefix('torch.')} {list(shape) if shape is not None else '[n]'}"
        raise CheckpointError(f"{where}: is {p['dtype']} {list(got_shape)}, expected {exp}")
    nbytes = math.prod(got_shape) * dt.itemsize
    off = p["offset"]
    if not is_int(p["nbytes"]) or p["nbytes"] != nbytes:
        raise CheckpointError(f"{where}: nbytes {p['nbytes']!r}, expected {nbytes} for {p['dtype']} {list(got_shape)}")
    if not is_int(off) or off < fe["data_start"] or off + nbytes > fe["data_end"]:
        raise CheckpointError(f"{where}: bytes [{off}, {off + nbytes if is_int(off) else '?'}) are not inside the "
                              f"file's data [{fe['data_start']}, {fe['data_end']})")
    if (off - fe["data_start"]) % dt.itemsize:
        raise CheckpointError(f"{where}: offset {off} is not aligned to its {dt.itemsize}-byte elements")
    h = header.get(sname)
    rel = [off - fe["data_start"], off - fe["data_start"] + nbytes]
    if not isinstance(h, dict) or h.get("dtype") != ST_DTYPES[dt] or h.get("shape") != list(got_shape) \
            or h.get("data_offsets") != rel:
        got = {k: h.get(k) for k in ("dtype", "shape", "data_offsets")} if isinstance(h, dict) else None
        raise CheckpointError(f"{where}: the safetensors header has {sname} as {got}, manifest says "
                              f"{{'dtype': '{ST_DTYPES[dt]}', 'shape': {list(got_shape)}, 'data_offsets': {rel}}}")
    return off, off + nbytes, sname


PAD_PREFIX = "__pad__."  # U8 tensors of zeros that align expert blocks (docs/FORMAT.md, 2b)


def pad_spans(fp: Path, fe: dict, header: dict) -> list[tuple[int, int, str]]:
    """The padding tensors of a file's header: 1-D U8, inside the data; their (start, end, name)."""
    spans = []
    for sname, h in header.items():
        if not sname.startswith(PAD_PREFIX):
            continue
        offs = h.get("data_offsets") if isinstance(h, dict) else None
        if not (isinstance(h, dict) and h.get("dtype") == "U8" and isinstance(h.get("shape"), list)
                and len(h["shape"]) == 1 and isinstance(offs, list) and len(offs) == 2 and all(is_int(o) for o in offs)
                and offs[1] - offs[0] == h["shape"][0] and fe["data_start"] + offs[1] <= fe["data_end"]):
            raise CheckpointError(f"{fp}: padding tensor {sname} is {h!r}, expected 1-D U8 inside the file's data")
        spans.append((fe["data_start"] + offs[0], fe["data_start"] + offs[1], sname))
    return spans


def check_layout(fp: Path, header: dict, spans: list[tuple[int, int, str]]) -> None:
    """No two parts of a file overlap, and every tensor of the header is a part of exactly one entry."""
    names = [s for _, _, s in spans]
    dup = sorted({s for s in names if names.count(s) > 1})
    if dup:
        raise CheckpointError(f"{fp}: {dup[0]} is claimed by two manifest entries")
    extra = sorted(set(header) - set(names) - {"__metadata__"})
    if extra:
        raise CheckpointError(f"{fp}: the safetensors header holds {extra[0]}, which no manifest entry lists")
    prev_end, prev = -1, None
    for start, end, sname in sorted(s for s in spans if s[1] > s[0]):
        if start < prev_end:
            raise CheckpointError(f"{fp}: parts {prev} and {sname} overlap (bytes {start}..{prev_end})")
        prev_end, prev = end, sname


__all__ = ["MAX_LAYERS", "PAD_PREFIX", "ST_DTYPES", "CheckpointError", "pad_spans", "check_entry", "check_entry_fields", "check_file_entry", "check_layout",
           "check_manifest_digest", "entry_parts", "manifest_digest", "read_header", "seal"]
