"""Guards around the folders sparseferry reads and writes.

Output folders: `--force` replaces only what sparseferry itself wrote (a checkpoint, a synthetic
model, a pruned HF folder) or an empty folder, never the source or a folder that contains it; the
temporary `.DST.partial-PID` / `.DST.old-PID` folders of processes that died are removed by the next
run that writes DST. Source folders: every file read or copied must be a regular file, and links
must stay inside the source folder (or, for a HuggingFace hub cache snapshot, inside its repository's
`blobs/`). Configs: values beyond any real model fail before anything is built from them.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import stat
from pathlib import Path

from .errors import SparseferryError
from .validate import CheckpointError

_log = logging.getLogger("sparseferry")

# files whose presence marks a folder as written by sparseferry
OUTPUT_MARKERS = ("sparseferry.json", "synth.json", "pruning.json")
# config values no real model comes near; beyond them a config is forged or broken
CONFIG_LIMITS = {
    "num_hidden_layers": 4096,
    "hidden_size": 1 << 18,
    "intermediate_size": 1 << 21,
    "vocab_size": 1 << 24,
    "num_attention_heads": 1 << 14,
    "num_key_value_heads": 1 << 14,
    "max_position_embeddings": 1 << 27,
    "num_local_experts": 1 << 14,
    "num_experts": 1 << 14,
}


class FolderError(CheckpointError):
    """An output folder cannot be (re)placed, or a source folder holds a file that cannot be read safely.
    (A CheckpointError: writers always raised that for an existing destination.)"""


class ConfigLimitError(SparseferryError):
    """A config value is beyond any real model (or not a number where one is needed)."""


# ----------------------------------------------------------------------------------------------
# Output folders


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temporaries(dst: Path) -> list[Path]:
    """Remove `.DST.partial-PID` and `.DST.old-PID` folders next to `dst` whose process is gone; returns them."""
    dst = Path(dst)
    removed = []
    if not dst.parent.is_dir():
        return removed
    for kind in ("partial", "old"):
        for p in dst.parent.glob(f".{dst.name}.{kind}-*"):
            pid = p.name.rsplit("-", 1)[-1]
            if not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)) or p.is_symlink() or not p.is_dir():
                continue
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
            _log.warning("sparseferry: removed %s, left by an interrupted run (process %s)", p, pid)
    return removed


def is_sparseferry_output(folder: Path) -> bool:
    return any((Path(folder) / m).is_file() for m in OUTPUT_MARKERS)


def prepare_output(dst, *, force: bool, sources=()) -> Path:
    """Check that `dst` may be written (and, with force, replaced); clean stale temporaries next to it.

    Raises FolderError if dst exists without force; if dst is a link, not a folder, the source (or
    one of `sources`), a folder containing a source, or a non-empty folder sparseferry did not write.
    """
    dst = Path(dst)
    clean_stale_temporaries(dst)
    if not dst.exists() and not dst.is_symlink():
        return dst
    if not force:
        raise FolderError(f"{dst}: already exists (pass --force / force=True to replace a previous sparseferry output)")
    if dst.is_symlink() or not dst.is_dir():
        raise FolderError(f"{dst}: is {'a link' if dst.is_symlink() else 'not a folder'}; --force replaces only a "
                          f"previous sparseferry output or an empty folder")
    d = dst.resolve()
    for src in sources:
        s = Path(src).resolve()
        if s == d or s.is_relative_to(d):
            raise FolderError(f"{dst}: is {'the source folder' if s == d else 'a folder containing the source ' + str(src)}; "
                              f"--force would delete the source: choose another output folder")
    if is_sparseferry_output(dst):
        return dst
    held = sorted(p.name for p in dst.iterdir())
    if held:
        shown = ", ".join(held[:3]) + (f" and {len(held) - 3} more" if len(held) > 3 else "")
        raise FolderError(f"{dst}: holds {shown}, not a sparseferry output; --force replaces only a previous "
                          f"sparseferry output or an empty folder")
    return dst


# ----------------------------------------------------------------------------------------------
# Source folders


def _allowed_root(src: Path) -> list[Path]:
    roots = [src]
    if src.parent.name == "snapshots":  # HuggingFace hub cache: snapshots/<rev>/file -> ../../blobs/<hash>
        roots.append(src.parent.parent / "blobs")
    return roots


def check_source_file(src, f) -> Path:
    """`f` (inside source folder `src`) is safe to read: a regular file, and a link only into the folder.

    Raises FolderError naming the file otherwise (a FIFO or device would block or never end; a link
    out of the folder would read another file's content).
    """
    src, f = Path(src).resolve(), Path(f)
    if f.is_symlink():
        target = f.resolve()
        if not any(target.is_relative_to(r) for r in _allowed_root(src)):
            raise FolderError(f"{f}: a link to {target}, outside the source folder {src}; copy the file in instead")
    try:
        st = os.stat(f)
    except OSError as e:
        raise FolderError(f"{f}: cannot be read ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise FolderError(f"{f}: is {kind}; expected a regular file")
    return f


# ----------------------------------------------------------------------------------------------
# Configs


def decode_floats(obj):
    """A config with transformers' encoding of non-finite floats ({"__float__": "Infinity"}) decoded to floats."""
    if isinstance(obj, dict):
        if set(obj) == {"__float__"} and isinstance(obj["__float__"], str):
            try:
                return float(obj["__float__"])
            except ValueError:
                raise ConfigLimitError(f"config: {obj!r} is not a float (expected Infinity, -Infinity or NaN)") from None
        return {k: decode_floats(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [decode_floats(v) for v in obj]
    return obj


def encode_floats(obj):
    """The inverse of decode_floats: non-finite floats as {"__float__": ...}, so the JSON is standard."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return {"__float__": "NaN" if math.isnan(obj) else ("Infinity" if obj > 0 else "-Infinity")}
    if isinstance(obj, dict):
        return {k: encode_floats(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [encode_floats(v) for v in obj]
    return obj


def check_config_limits(config, where: str = "config.json") -> None:
    """Raise ConfigLimitError for a size field (layers, hidden size, vocabulary, ...) beyond CONFIG_LIMITS."""
    for key, limit in CONFIG_LIMITS.items():
        try:
            v = getattr(config, key, None) if not isinstance(config, dict) else config.get(key)
        except Exception:  # noqa: BLE001 - a config property that cannot be computed: not ours to judge
            continue
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= limit:
            raise ConfigLimitError(f"{where}: {key} = {v!r}, expected an integer in [0, {limit}] (no real model is larger)")


__all__ = ["CONFIG_LIMITS", "ConfigLimitError", "FolderError", "check_config_limits", "check_source_file",
           "clean_stale_temporaries", "decode_floats", "encode_floats", "is_sparseferry_output", "prepare_output"]
