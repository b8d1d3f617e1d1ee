"""Text for calibration and evaluation that every machine already has: no download, no data set.

Sources (`available_sources()` lists those present here):
  "stdlib"  the docstrings of Python's standard library, read from its source files with `ast`.
            Nothing is imported, so no module runs (no `antigravity` browser, no `this` print, no
            Tk window) and a module that does not parse is skipped. Modules are visited in sorted
            name order; docstrings in source order (module, then classes and functions depth-first).
            Each docstring is cleaned (`inspect.cleandoc`), tabs expanded, trailing spaces and
            repeated blank lines removed, and kept if it has at least `_MIN_CHARS` characters and
            has not been seen before (first occurrence wins). The corpus is therefore the same on
            every run of the same Python installation; it differs between Python versions.
  "web"     the World English Bible (public domain) where a SWORD module of it is installed, e.g. by
            the Debian package `sword-text-web` (/usr/share/sword). Looked up in $SWORD_PATH,
            ~/.sword, /usr/share/sword, /usr/local/share/sword. Only the "zText" driver with ZIP
            compression is read (the layout that package uses, see `read_sword_ztext`).
  a path    any UTF-8 text file: paragraphs are separated by blank lines.

Split: every source is a list of named units (a module, a Bible book, a paragraph of a file). A unit
is held out for evaluation when crc32(name) % `HELDOUT_MODULUS` == 0, else it is calibration text;
crc32 (unlike `hash()`) is the same in every process. A text file's units are its paragraphs, named
by their index, so the split interleaves through the file.
"""
from __future__ import annotations

import ast
import functools
import inspect
import os
import re
import struct
import sysconfig
import zlib
from pathlib import Path

from .errors import SparseferryError

HELDOUT_MODULUS = 10  # ~1 unit in 10 is held out for evaluation
_MIN_CHARS = 40  # shorter docstrings ("Return self.") are mostly boilerplate

# Never read, even though they parse: test suites (not documentation, and huge), the IDE and Tk
# packages, bundled demo/data packages and the jokes.
_SKIP_TOP = {"test", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip", "pydoc_data", "antigravity",
             "this", "__phello__", "__hello__", "site-packages", "dist-packages", "lib-dynload"}
_SKIP_PARTS = {"test", "tests", "idle_test", "__pycache__"}


class TextSourceError(SparseferryError):
    """A text source is unknown, missing here, or cannot be read."""


# ----------------------------------------------------------------------------------------------------
# public API


def available_sources() -> list[str]:
    """Names of the built-in sources readable on this machine ("stdlib" always; "web" if installed)."""
    out = ["stdlib"]
    if find_sword_module("WEB") is not None:
        out.append("web")
    return out


def calibration_text(source="stdlib") -> str:
    """The calibration part of `source` ("stdlib", "web", or a path to a text file), units joined by blank lines."""
    return _split(str(source))[0]


def evaluation_text(source="stdlib") -> str:
    """The held-out part of `source`: disjoint from `calibration_text(source)` (no unit is in both)."""
    return _split(str(source))[1]


def source_units(source="stdlib") -> list[tuple[str, str]]:
    """(name, text) units of a source, in their fixed order. Raises TextSourceError if it is unavailable."""
    if source == "stdlib":
        return list(stdlib_docstrings())
    if source == "web":
        mod = find_sword_module("WEB")
        if mod is None:
            raise TextSourceError("source 'web': no World English Bible SWORD module found (install the Debian "
                                  "package sword-text-web, or set SWORD_PATH to a SWORD library folder)")
        return list(read_sword_ztext(mod))
    p = Path(source).expanduser()
    if not p.is_file():
        raise TextSourceError(f"text source {source!r}: not 'stdlib', 'web' or an existing file")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TextSourceError(f"{p}: cannot be read as UTF-8 text ({e})") from None
    paras = [normalize(t) for t in re.split(r"\n\s*\n", text)]
    return [(f"{p.name}:{i}", t) for i, t in enumerate(x for x in paras if x)]


def is_heldout(name: str) -> bool:
    """The split rule: a unit is evaluation text iff crc32 of its UTF-8 name is divisible by HELDOUT_MODULUS."""
    return zlib.crc32(name.encode("utf-8")) % HELDOUT_MODULUS == 0


def normalize(text: str) -> str:
    """Expand tabs, drop trailing spaces, collapse runs of blank lines to one, strip the ends."""
    lines = [ln.rstrip() for ln in text.expandtabs(4).splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


@functools.lru_cache(maxsize=8)
def _split(source: str) -> tuple[str, str]:
    units = source_units(source)
    calib = [t for n, t in units if not is_heldout(n)]
    held = [t for n, t in units if is_heldout(n)]
    if not calib or not held:
        raise TextSourceError(f"text source {source!r}: {len(units)} units are too few to split into "
                              "calibration and evaluation text")
    return "\n\n".join(calib), "\n\n".join(held)


# ----------------------------------------------------------------------------------------------------
# "stdlib": docstrings of the standard library


def stdlib_dir() -> Path:
    """The folder of the running interpreter's standard library sources (not the virtualenv's site-packages)."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_modules(root: Path | None = None) -> list[tuple[str, Path]]:
    """(dotted module name, source file) of the standard library, sorted by name, skipping `_SKIP_*`."""
    root = Path(root) if root is not None else stdlib_dir()
    mods = []
    for p in root.rglob("*.py"):
        rel = p.relative_to(root)
        parts = rel.with_suffix("").parts
        if parts[0] in _SKIP_TOP or parts[0].startswith("config-") or _SKIP_PARTS & set(parts[:-1]):
            continue
        if parts[-1].startswith("test_") or parts[-1] in _SKIP_PARTS:
            continue
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts and all(x.isidentifier() for x in parts):
            mods.append((".".join(parts), p))
    mods.sort()
    return mods


def module_docstrings(source: str) -> list[str]:
    """Cleaned docstrings of one module's source, in source order (module, classes, functions, nested).

    Raises SyntaxError / ValueError when the source does not parse.
    """
    tree = ast.parse(source)
    out = []

    def visit(node):
        doc = ast.get_docstring(node, clean=False)
        if doc:
            out.append(normalize(inspect.cleandoc(doc)))
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child)
            elif isinstance(child, (ast.If, ast.Try, ast.With)):  # defs under `if sys.platform...`, `try: import`
                for sub in ast.iter_child_nodes(child):
                    if isinstance(sub, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                        visit(sub)

    visit(tree)
    return out


@functools.lru_cache(maxsize=2)
def stdlib_docstrings(root: Path | None = None) -> tuple[tuple[str, str], ...]:
    """(module name, its new docstrings joined by blank lines) for every stdlib module with any.

    Deterministic for a given standard library folder; see the module docstring for the rules.
    """
    seen: set[str] = set()
    units = []
    for name, path in stdlib_modules(root):
        try:
            docs = module_docstrings(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
            continue  # unreadable or not parseable by this Python: skipped, the same way every run
        keep = []
        for d in docs:
            if len(d) >= _MIN_CHARS and d not in seen:
                seen.add(d)
                keep.append(d)
        if keep:
            units.append((name, "\n\n".join(keep)))
    if not units:
        raise TextSourceError(f"{stdlib_dir() if root is None else root}: no standard library sources with "
                              "docstrings found (is this a Python installation without .py files?)")
    return tuple(units)


# ----------------------------------------------------------------------------------------------------
# "web": a SWORD zText module (the World English Bible)


def sword_paths() -> list[Path]:
    """SWORD library folders searched, in order: $SWORD_PATH (os.pathsep-separated), ~/.sword, system ones."""
    env = [Path(p) for p in os.environ.get("SWORD_PATH", "").split(os.pathsep) if p]
    return env + [Path.home() / ".sword", Path("/usr/share/sword"), Path("/usr/local/share/sword")]


def _read_conf(path: Path) -> dict[str, str]:
    conf = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if "=" in line and not line.lstrip().startswith(("#", "[")):
            k, v = line.split("=", 1)
            conf.setdefault(k.strip(), v.strip())
    return conf


def find_sword_module(abbreviation: str = "WEB") -> Path | None:
    """Data folder of the first installed SWORD module whose conf has `Abbreviation=<abbreviation>`.

    Only modules readable by `read_sword_ztext` (ModDrv=zText, CompressType=ZIP) are returned.
    """
    for root in sword_paths():
        mods = root / "mods.d"
        if not mods.is_dir():
            continue
        for conf_path in sorted(mods.glob("*.conf")):
            conf = _read_conf(conf_path)
            if (conf.get("Abbreviation") == abbreviation and conf.get("ModDrv", "").lower() == "ztext"
                    and conf.get("CompressType", "ZIP").upper() == "ZIP" and "DataPath" in conf):
                data = (root / conf["DataPath"]).resolve()
                if (data / "ot.bzs").is_file() or (data / "nt.bzs").is_file():
                    return data
    return None


_NOTE = re.compile(r"<note\b[^>]*>.*?</note>", re.S)  # footnotes: their text is not running prose
_TAG = re.compile(r"<[^>]*>")
# A tag becomes a space (`<w>Yahweh</w><note/><w>called</w>` must not glue two words), then the spaces
# that leaves inside punctuation go: `<w>Israel</w>,` -> "Israel ," -> "Israel,"; `“<w>Speak` -> "“Speak".
_SPACE_BEFORE = re.compile(r" +([,.;:!?)\]’”])")
_SPACE_AFTER = re.compile(r"([(\[“‘]) +")


def osis_to_plain(raw: str) -> str:
    """Plain text of an OSIS XML fragment: footnotes dropped, tags removed, whitespace collapsed."""
    text = " ".join(_TAG.sub(" ", _NOTE.sub(" ", raw)).split())
    return _SPACE_AFTER.sub(r"\1", _SPACE_BEFORE.sub(r"\1", text))


def read_sword_ztext(folder) -> list[tuple[str, str]]:
    """(name, plain text) per compressed block of a SWORD zText module (one Bible book per block).

    Layout read, for each testament t in ("ot", "nt") that exists:
      t.bzs  block index:  per block 12 bytes, little-endian u32 (offset in t.bzz, compressed size, plain size)
      t.bzz  the blocks, each zlib-compressed; a block holds its verses' OSIS XML back to back
      t.bzv  verse index:  per verse 10 bytes, u32 block, u32 offset in the plain block, u16 size
    Verses are taken in .bzv order, OSIS footnotes dropped, tags removed, whitespace collapsed.
    Units are named "<t>:<block number>". Raises TextSourceError on a truncated or corrupt file.
    """
    folder = Path(folder)
    units = []
    for t in ("ot", "nt"):
        if not (folder / f"{t}.bzs").is_file():
            continue
        try:
            bzs = (folder / f"{t}.bzs").read_bytes()
            bzz = (folder / f"{t}.bzz").read_bytes()
            bzv = (folder / f"{t}.bzv").read_bytes()
        except OSError as e:
            raise TextSourceError(f"{folder}: cannot read SWORD module files ({e})") from None
        if len(bzs) % 12 or len(bzv) % 10:
            raise TextSourceError(f"{folder}/{t}.bzs or {t}.bzv: size not a multiple of its 12/10-byte entries")
        blocks: dict[int, bytes] = {}
        verses: dict[int, list[str]] = {}
        for i in range(0, len(bzv), 10):
            b, off, size = struct.unpack_from("<IIH", bzv, i)
            if size == 0:
                continue
            if b not in blocks:
                if 12 * b + 12 > len(bzs):
                    raise TextSourceError(f"{folder}/{t}.bzv: verse {i // 10} names block {b}, {t}.bzs has {len(bzs) // 12}")
                zoff, zsize, _ = struct.unpack_from("<III", bzs, 12 * b)
                try:
                    blocks[b] = zlib.decompress(bzz[zoff:zoff + zsize])
                except zlib.error as e:
                    raise TextSourceError(f"{folder}/{t}.bzz: block {b} does not decompress ({e})") from None
            raw = blocks[b][off:off + size].decode("utf-8", errors="replace")
            plain = osis_to_plain(raw)
            if plain:
                verses.setdefault(b, []).append(plain)
        units += [(f"{t}:{b}", " ".join(v)) for b, v in sorted(verses.items())]
    if not units:
        raise TextSourceError(f"{folder}: no verses found in this SWORD module")
    return units


__all__ = ["TextSourceError", "available_sources", "calibration_text", "evaluation_text", "find_sword_module",
           "is_heldout", "module_docstrings", "normalize", "osis_to_plain", "read_sword_ztext", "source_units", "stdlib_docstrings"]
