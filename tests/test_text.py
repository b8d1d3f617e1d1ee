"""The text sources for calibration and evaluation: what they contain, how they split, that they never change.

The standard library corpus is read from source with `ast` (nothing imported), in sorted module order,
deduplicated; a unit (module, Bible book, paragraph) is held out iff crc32(name) % 10 == 0.
"""
from __future__ import annotations

import hashlib
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import pytest

from sparseferry.errors import SparseferryError
from sparseferry.text import (
    HELDOUT_MODULUS,
    TextSourceError,
    available_sources,
    calibration_text,
    evaluation_text,
    find_sword_module,
    is_heldout,
    module_docstrings,
    normalize,
    read_sword_ztext,
    source_units,
    stdlib_docstrings,
)

# ------------------------------------------------------------------------------------------------ stdlib


def test_stdlib_corpus_is_large_english_prose_split_about_one_in_ten():
    calib, held = calibration_text(), evaluation_text()
    assert len(calib) > 500_000 and len(held) > 30_000  # enough for 32 x 512 calibration tokens and 8 x 512 held out
    assert 0.03 < len(held) / (len(calib) + len(held)) < 0.25
    assert "Return" in calib and " the " in held


def test_calibration_and_evaluation_are_disjoint_by_unit():
    units = source_units("stdlib")
    held = [t for n, t in units if is_heldout(n)]
    calib = [t for n, t in units if not is_heldout(n)]
    assert evaluation_text() == "\n\n".join(held) and calibration_text() == "\n\n".join(calib)
    assert set(held).isdisjoint(calib)


def test_stdlib_units_are_sorted_and_skip_tests_ide_tk_and_jokes():
    names = [n for n, _ in stdlib_docstrings()]
    assert names == sorted(names) and len(names) == len(set(names))
    for n in names:
        top = n.split(".")[0]
        assert top not in {"test", "idlelib", "tkinter", "turtledemo", "lib2to3", "antigravity", "this"}, n
        assert "tests" not in n.split(".") and "test" not in n.split("."), n
    assert {"argparse", "collections", "json.decoder"} <= set(names)


def test_corpus_is_identical_in_a_fresh_process_and_imports_nothing():
    # A different hash seed in the child: the split must not depend on Python's salted hash().
    code = textwrap.dedent("""
        import hashlib, sys
        from sparseferry.text import calibration_text, evaluation_text
        before = set(sys.modules)
        c, e = calibration_text(), evaluation_text()
        new = set(sys.modules) - before
        print(hashlib.sha256(c.encode()).hexdigest(), hashlib.sha256(e.encode()).hexdigest())
        print(sorted(m for m in new if m.split(".")[0] in {"turtle", "tkinter", "antigravity", "webbrowser", "this", "idlelib", "smtpd"}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "PYTHONHASHSEED": "12345"}).stdout.splitlines()
    here = f"{hashlib.sha256(calibration_text().encode()).hexdigest()} {hashlib.sha256(evaluation_text().encode()).hexdigest()}"
    assert out[0] == here
    assert out[1] == "[]"


def _write(root: Path, rel: str, src: str) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(textwrap.dedent(src))


def test_docstrings_are_collected_in_source_order_deduplicated_and_filtered(tmp_path):
    long = "This sentence is long enough to be kept in the corpus."
    _write(tmp_path, "zeta.py", f'''
        """Zeta module: {long}"""
        def f():
            """Shared docstring: {long}"""
    ''')
    _write(tmp_path, "alpha/__init__.py", f'''
        """Alpha package: {long}"""
        class A:
            """Class A:\tindented   {long}   """
            def m(self):
                """Method m: {long}"""
                def inner():
                    """Inner: {long}"""
        if True:
            def g():
                """Shared docstring: {long}"""
        def short():
            """Too short."""
    ''')
    _write(tmp_path, "alpha/test/test_a.py", f'"""Test module: {long}"""')
    _write(tmp_path, "beta/tests/helper.py", f'"""Helper: {long}"""')
    _write(tmp_path, "idlelib/x.py", f'"""IDE: {long}"""')
    _write(tmp_path, "broken.py", f'"""Broken: {long}"""\ndef (:\n')
    stdlib_docstrings.cache_clear()
    units = stdlib_docstrings(tmp_path)
    stdlib_docstrings.cache_clear()
    assert [n for n, _ in units] == ["alpha", "zeta"]
    alpha = units[0][1].split("\n\n")
    assert alpha == [f"Alpha package: {long}", "Class A:\tindented".expandtabs() + f"   {long}", f"Method m: {long}", f"Inner: {long}",
                     f"Shared docstring: {long}"]
    assert units[1][1] == f"Zeta module: {long}"  # its copy of the shared docstring came second: dropped


def test_module_docstrings_raise_on_source_that_does_not_parse():
    with pytest.raises(SyntaxError):
        module_docstrings("def (:")


def test_normalize_expands_tabs_strips_trailing_space_and_collapses_blank_lines():
    assert normalize("\na\tb  \n\n\n\n  c   \n") == "a   b\n\n  c"  # a tab stop every 4 columns; indentation kept


# ------------------------------------------------------------------------------------------------ text files


def test_a_text_file_splits_by_paragraph_index(tmp_path):
    paras = [f"Paragraph number {i} says something." for i in range(40)]
    f = tmp_path / "book.txt"
    f.write_text("\n\n \n".join(paras) + "\n")
    units = source_units(str(f))
    assert [t for _, t in units] == paras
    held = [t for n, t in units if is_heldout(n)]
    assert held and evaluation_text(f) == "\n\n".join(held)
    assert calibration_text(f) == "\n\n".join(t for n, t in units if not is_heldout(n))


def test_is_heldout_is_crc32_of_the_name():
    for name in ("argparse", "json.decoder", "ot:1", "book.txt:7"):
        assert is_heldout(name) == (zlib.crc32(name.encode()) % HELDOUT_MODULUS == 0)


def test_unknown_or_missing_sources_raise_a_named_error(tmp_path):
    with pytest.raises(TextSourceError, match="nosuch.txt"):
        calibration_text(str(tmp_path / "nosuch.txt"))
    one = tmp_path / "one.txt"
    one.write_text("A single paragraph cannot be split.")
    with pytest.raises(SparseferryError, match="too few"):
        evaluation_text(one)


# ------------------------------------------------------------------------------------------------ SWORD (World English Bible)


def _make_ztext(root: Path, books: list[list[str]]) -> Path:
    """A minimal SWORD zText module: one zlib block per book, verses back to back, as osis2mod writes."""
    data = root / "modules" / "texts" / "ztext" / "tiny"
    data.mkdir(parents=True)
    (root / "mods.d").mkdir()
    (root / "mods.d" / "tiny.conf").write_text(
        "[Tiny]\nAbbreviation=WEB\nDataPath=./modules/texts/ztext/tiny/\nModDrv=zText\nCompressType=ZIP\nEncoding=UTF-8\n")
    bzs, bzz, bzv = b"", b"", struct.pack("<IIH", 0, 0, 0)  # entry 0: an empty placeholder verse
    for b, verses in enumerate(books):
        plain = b""
        for v in verses:
            raw = v.encode()
            bzv += struct.pack("<IIH", b, len(plain), len(raw))
            plain += raw
        z = zlib.compress(plain)
        bzs += struct.pack("<III", len(bzz), len(z), len(plain))
        bzz += z
    (data / "ot.bzs").write_bytes(bzs)
    (data / "ot.bzz").write_bytes(bzz)
    (data / "ot.bzv").write_bytes(bzv)
    return data


def test_sword_ztext_reads_verses_without_markup_or_footnotes(tmp_path, monkeypatch):
    data = _make_ztext(tmp_path, [
        ['<title type="main">Genesis</title> <div sID="g1" type="x-p"/>In the beginning, God created the heavens and the earth.',
         'The earth was formless<note placement="foot"><reference>1:2</reference>Or, empty.</note> and empty.'],
        ['<w lemma="x">Now</w> these are the names of <w>Israel</w>, “<w>Speak</w>.” <w>Yahweh</w><note>A name.</note><w>called</w>'],
    ])
    monkeypatch.setenv("SWORD_PATH", str(tmp_path))
    assert find_sword_module("WEB") == data.resolve()
    assert "web" in available_sources()
    assert read_sword_ztext(data) == [
        ("ot:0", "Genesis In the beginning, God created the heavens and the earth. The earth was formless and empty."),
        ("ot:1", "Now these are the names of Israel, “Speak.” Yahweh called"),
    ]


def test_sword_ztext_rejects_a_truncated_index(tmp_path):
    data = _make_ztext(tmp_path, [["In the beginning."]])
    (data / "ot.bzv").write_bytes((data / "ot.bzv").read_bytes()[:-3])
    with pytest.raises(TextSourceError, match="ot.bzv"):
        read_sword_ztext(data)


def test_web_source_when_the_debian_package_is_installed():
    if "web" not in available_sources():
        pytest.skip("World English Bible not installed (Debian package sword-text-web)")
    calib, held = calibration_text("web"), evaluation_text("web")
    assert "In the beginning, God created the heavens and the earth." in calib + held
    assert len(held) > 100_000 and "<" not in held[:10_000]
