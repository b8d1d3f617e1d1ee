"""A seeded generator of corrupted and forged sparseferry checkpoints (used by tests/test_corpus.py).

Each variant is a named edit of a copy of a pristine checkpoint folder:

    truncate      a file cut short, or grown
    header-flip   one byte of a safetensors header flipped (header digest not updated)
    header-forge  a header entry's dtype / shape / data_offsets rewritten, the header digest updated
    data-flip     one data byte flipped (digests not updated)
    manifest      one field of the manifest changed (every kind of field: top level, file entries,
                  tensor entries, parts), resealed (manifest digest updated) or not
    forge-bits    bitmask, row_offsets or block_offsets bytes changed so that they contradict each
                  other, with every digest (part, file, manifest) updated: a forger who knows the format
    files         layer files swapped, missing or duplicated; manifest entries duplicated
    quant         the same edits on the quantized parts of an int8 / int4 checkpoint (codes, scales,
                  zeros, group_size, values)

Forgeries that keep the file self-consistent (a valid bitmap with other positions, other values,
an edited config) are deliberately absent: nothing can tell them from a genuine checkpoint
(docs/FORMAT.md, 4).
"""
from __future__ import annotations

import copy
import json
import random
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import xxhash

from sparseferry.store import MANIFEST
from sparseferry.validate import seal


@dataclass
class Variant:
    name: str
    kind: str
    apply: Callable[[Path], None]


def h(b: bytes) -> str:
    return xxhash.xxh3_64_hexdigest(b)


def read_manifest(folder: Path) -> dict:
    return json.loads((folder / MANIFEST).read_text())


def write_manifest(folder: Path, m: dict, sealed: bool = True) -> None:
    (folder / MANIFEST).write_text(json.dumps(seal(m) if sealed else m))


def reseal_file(folder: Path, rel: str, m: dict | None = None) -> None:
    """Recompute every digest of file `rel` (parts, data, header) and the manifest's: a full forgery."""
    m = m or read_manifest(folder)
    data = (folder / rel).read_bytes()
    fe = m["files"][rel]
    fe["size"] = fe["data_end"] = len(data)
    n = struct.unpack("<Q", data[:8])[0]
    fe["data_start"] = 8 + n
    fe["digest"] = h(data[fe["data_start"]:])
    fe["header_digest"] = h(data[: fe["data_start"]])
    for e in m["tensors"].values():
        if e.get("file") == rel:
            for p in e["parts"].values():
                p["digest"] = h(data[p["offset"]: p["offset"] + p["nbytes"]])
    write_manifest(folder, m)


def _flip(path: Path, pos: int, mask: int = 0xFF) -> None:
    with open(path, "r+b") as f:
        f.seek(pos)
        b = f.read(1)
        f.seek(pos)
        f.write(bytes([b[0] ^ mask]))


def _leaves(obj, path=()):
    """(path, value) of every leaf of a JSON object."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, path + (k,))
    elif isinstance(obj, list) and obj and not all(isinstance(x, int) for x in obj):
        for i, v in enumerate(obj):
            yield from _leaves(v, path + (i,))
    else:
        yield path, obj


def _get(obj, path):
    for k in path:
        obj = obj[k]
    return obj


def _set(obj, path, value):
    _get(obj, path[:-1])[path[-1]] = value


def _other_values(v, rng: random.Random) -> list:
    """Edits of one field value, by its type."""
    if isinstance(v, bool):
        return [not v]
    if isinstance(v, int):
        return [v + 1, v - 1, v + 8, v - 8, 0, -1, 2 ** 62, str(v), None, float(v) + 0.5]
    if isinstance(v, float):
        return [v * 2, -v, None]
    if isinstance(v, str):
        return ["", v + "x", v[:-1], "bfloat16", "float16", "int8", "dense", "bitmap", 7]
    if isinstance(v, list):
        return [v[:-1], v + [1], list(reversed(v)), [x + 1 for x in v], [], "x"]
    if v is None:
        return [0, 5, "x"]
    return [None]


def manifest_variants(m: dict, rng: random.Random, per_field: int, label: str) -> list[Variant]:
    """Edits of every kind of manifest field: one group per field key, `per_field` samples in it."""
    groups: dict[str, list] = {}
    for path, v in _leaves({k: v for k, v in m.items() if k != "config"}):
        # field kind: the key, with its position class (files / tensors / parts / top level)
        kind = ".".join(str(p) for p in path if not (isinstance(p, str) and ("/" in p or p.startswith("model.")))
                        and not isinstance(p, int))
        groups.setdefault(kind, []).append((path, v))
    out = []
    for kind, items in sorted(groups.items()):
        for _ in range(per_field):
            path, v = rng.choice(items)
            new = rng.choice(_other_values(v, rng))
            if new == v:
                continue
            sealed = rng.random() < 0.85

            def apply(folder, path=path, new=new, sealed=sealed):
                mm = read_manifest(folder)
                _set(mm, path, new)
                write_manifest(folder, mm, sealed=sealed)

            out.append(Variant(f"{label}manifest {'/'.join(map(str, path))} = {new!r}{'' if sealed else ' (unsealed)'}",
                               "manifest", apply))
    # structural edits: remove a key of a tensor / part / file entry, drop or add entries
    tensors = sorted(m["tensors"])
    for _ in range(per_field * 3):
        t = rng.choice(tensors)
        what = rng.choice(["drop-key", "drop-part", "drop-tensor", "dup-tensor", "swap-parts", "swap-tensors"])

        def apply(folder, t=t, what=what, seed=rng.random()):
            r = random.Random(seed)
            mm = read_manifest(folder)
            e = mm["tensors"][t]
            if what == "drop-key":
                e.pop(r.choice(sorted(e)))
            elif what == "drop-part":
                e["parts"].pop(r.choice(sorted(e["parts"])))
            elif what == "drop-tensor":
                mm["tensors"].pop(t)
            elif what == "dup-tensor":
                mm["tensors"][t + ".copy"] = copy.deepcopy(e)
            elif what == "swap-parts" and len(e["parts"]) > 1:
                a, b = r.sample(sorted(e["parts"]), 2)
                e["parts"][a], e["parts"][b] = e["parts"][b], e["parts"][a]
            else:  # swap two same-shaped tensors' entries (gate / up projections)
                same = [n for n in mm["tensors"] if n != t and mm["tensors"][n]["shape"] == e["shape"]]
                if same:
                    o = r.choice(sorted(same))
                    mm["tensors"][t], mm["tensors"][o] = mm["tensors"][o], e
            write_manifest(folder, mm)

        out.append(Variant(f"{label}manifest {what} {t}", "manifest", apply))
    # unsealed config edit and a truncated manifest
    out.append(Variant(f"{label}manifest config edited (unsealed)", "manifest",
                       lambda f: write_manifest(f, {**read_manifest(f), "config": {**read_manifest(f)["config"],
                                                                                    "rms_norm_eps": 0.5}}, sealed=False)))
    out.append(Variant(f"{label}manifest truncated", "manifest",
                       lambda f: (f / MANIFEST).write_bytes((f / MANIFEST).read_bytes()[:200])))
    return out


def file_variants(m: dict, rng: random.Random, n: int, label: str) -> list[Variant]:
    files = sorted(m["files"])
    out = []
    for _ in range(n):
        rel = rng.choice(files)
        size = m["files"][rel]["size"]
        cut = rng.randrange(0, size)
        out.append(Variant(f"{label}truncate {rel} to {cut}", "truncate",
                           lambda f, rel=rel, cut=cut: (f / rel).write_bytes((f / rel).read_bytes()[:cut])))
        grow = rng.choice([1, 8, 4096])
        out.append(Variant(f"{label}grow {rel} by {grow}", "truncate",
                           lambda f, rel=rel, grow=grow: (f / rel).write_bytes((f / rel).read_bytes() + b"\0" * grow)))
        ds = m["files"][rel]["data_start"]
        pos = rng.randrange(0, ds)
        out.append(Variant(f"{label}header-flip {rel}@{pos}", "header-flip", lambda f, rel=rel, pos=pos: _flip(f / rel, pos)))
        dpos, bit = rng.randrange(ds, size), 1 << rng.randrange(8)
        out.append(Variant(f"{label}data-flip {rel}@{dpos}", "data-flip",
                           lambda f, rel=rel, dpos=dpos, bit=bit: _flip(f / rel, dpos, bit)))
    return out


def header_forge_variants(m: dict, rng: random.Random, n: int, label: str) -> list[Variant]:
    """Rewrite one header entry (padding keeps the header's length), header digest updated."""
    out = []
    files = sorted(m["files"])
    for _ in range(n):
        rel = rng.choice(files)
        field = rng.choice(["dtype", "shape", "data_offsets", "rename", "drop", "add"])

        def apply(folder, rel=rel, field=field, seed=rng.random()):
            r = random.Random(seed)
            path = folder / rel
            data = path.read_bytes()
            nh = struct.unpack("<Q", data[:8])[0]
            header = json.loads(data[8:8 + nh])
            name = r.choice(sorted(k for k in header if k != "__metadata__"))
            ent = header[name]
            if field == "dtype":
                ent["dtype"] = r.choice([d for d in ("BF16", "F16", "F32", "I64", "U8", "I8", "I32") if d != ent["dtype"]])
            elif field == "shape":
                ent["shape"] = ent["shape"][:-1] + [ent["shape"][-1] + r.choice([-1, 1])] if ent["shape"] else [1]
            elif field == "data_offsets":
                d = r.choice([-8, -2, 2, 8])
                ent["data_offsets"] = [ent["data_offsets"][0] + d, ent["data_offsets"][1] + d]
            elif field == "rename":
                header[name[:-1] + ("x" if name[-1] != "x" else "y")] = header.pop(name)
            elif field == "drop":
                header.pop(name)
            else:
                header["extra.tensor"] = {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}
            raw = json.dumps(header, separators=(",", ":")).encode()
            if len(raw) > nh:
                return  # does not fit: the variant degenerates to the pristine file
            path.write_bytes(data[:8] + raw + b" " * (nh - len(raw)) + data[8 + nh:])
            reseal_file(folder, rel)

        out.append(Variant(f"{label}header-forge {rel} {field}", "header-forge", apply))
    return out


def forge_bits_variants(m: dict, rng: random.Random, n: int, label: str) -> list[Variant]:
    """Change bitmask / row_offsets / block_offsets bytes so they contradict each other; reseal everything."""
    enc = sorted(k for k, e in m["tensors"].items() if e["encoding"] == "bitmap")
    out = []
    for _ in range(n):
        t = rng.choice(enc)
        parts = [p for p in ("bitmask", "row_offsets", "block_offsets") if p in m["tensors"][t]["parts"]]
        part = rng.choice(parts)

        def apply(folder, t=t, part=part, seed=rng.random()):
            r = random.Random(seed)
            mm = read_manifest(folder)
            p = mm["tensors"][t]["parts"][part]
            path = folder / mm["tensors"][t]["file"]
            data = bytearray(path.read_bytes())
            if part == "bitmask":  # set or clear one bit
                pos = p["offset"] + r.randrange(p["nbytes"])
                data[pos] ^= 1 << r.randrange(8)
            else:  # one offset +/- 1 (int64 / int32 little endian)
                size = 8 if part == "row_offsets" else 4
                k = r.randrange(p["nbytes"] // size)
                pos = p["offset"] + k * size
                v = int.from_bytes(data[pos:pos + size], "little", signed=True) + r.choice([-1, 1, 1000])
                data[pos:pos + size] = v.to_bytes(size, "little", signed=True)
            path.write_bytes(bytes(data))
            reseal_file(folder, mm["tensors"][t]["file"], mm)

        out.append(Variant(f"{label}forge-bits {t}.{part}", "forge-bits", apply))
    return out


def swap_variants(m: dict, label: str) -> list[Variant]:
    layers = sorted(f for f in m["files"] if f.startswith("layers/"))
    a, b = layers[0], layers[1]

    def swap(folder):
        x, y = (folder / a).read_bytes(), (folder / b).read_bytes()
        (folder / a).write_bytes(y)
        (folder / b).write_bytes(x)

    def swap_resealed(folder):
        swap(folder)
        mm = read_manifest(folder)
        mm["files"][a], mm["files"][b] = mm["files"][b], mm["files"][a]
        write_manifest(folder, mm)

    def link(folder):
        (folder / b).unlink()
        (folder / b).symlink_to("/etc/hostname")

    return [
        Variant(f"{label}files swapped {a} <-> {b}", "files", swap),
        Variant(f"{label}files swapped with their manifest entries", "files", swap_resealed),
        Variant(f"{label}file missing {b}", "files", lambda f: (f / b).unlink()),
        Variant(f"{label}file missing extra.safetensors", "files", lambda f: (f / "extra.safetensors").unlink()),
        Variant(f"{label}file duplicated {a} -> {b}", "files", lambda f: shutil.copy(f / a, f / b)),
        Variant(f"{label}file replaced by a link out of the folder", "files", link),
        Variant(f"{label}manifest lists a file twice", "files",
                lambda f: write_manifest(f, {**read_manifest(f), "files": {**read_manifest(f)["files"],
                                                                            "layers/./" + a[7:]: read_manifest(f)["files"][a]}})),
        Variant(f"{label}manifest file outside the folder", "files",
                lambda f: write_manifest(f, {**read_manifest(f), "files": {**read_manifest(f)["files"],
                                                                            "../escape.safetensors": read_manifest(f)["files"][a]}})),
        Variant(f"{label}config.json and tokenizer missing", "files",
                lambda f: [(f / n).unlink() for n in ("config.json",) if (f / n).exists()]),
    ]


def corpus(pristine: dict[str, Path], seed: int = 0, scale: int = 1) -> list[Variant]:
    """Variants of every kind for each pristine checkpoint ({label: folder}); ~150 * scale per label."""
    rng = random.Random(seed)
    out = []
    for label, folder in pristine.items():
        m = read_manifest(folder)
        tag = f"[{label}] "
        out += file_variants(m, rng, 6 * scale, tag)
        out += header_forge_variants(m, rng, 12 * scale, tag)
        out += manifest_variants(m, rng, scale, tag)
        out += forge_bits_variants(m, rng, 12 * scale, tag)
        out += swap_variants(m, tag)
    return out
