"""Calibration samples: random windows of `seqlen` tokens from a text, reproducible from a seed.

Also the text-file reader that perplexity evaluation shares: a plain UTF-8 text file, or JSON Lines
with a "text" field per line (the layout of C4 / WikiText dumps), records joined by blank lines.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .masks import PruneError

_TEXT_SUFFIXES = (".txt", ".text", ".jsonl", ".json", ".md", ".rst", ".csv")


def looks_like_path(text) -> bool:
    """Whether `text` names a file rather than being the text itself.

    A `Path` always names a file. A str does when it exists as a file, or when it is a single short
    line that ends in a text-file suffix or contains a path separator (so a mistyped path gives a
    "missing file" error instead of being read as a tiny text).
    """
    if isinstance(text, os.PathLike):
        return True
    if not isinstance(text, str) or "\n" in text or len(text) > 4096:
        return False
    if os.path.isfile(text):
        return True
    s = text.strip()
    return " " not in s and (s.lower().endswith(_TEXT_SUFFIXES) or os.sep in s)


def read_text_file(path, error=PruneError) -> str:
    """The text of a plain-text or JSONL file (records' "text" fields joined by blank lines).

    Raises `error` (a SparseferryError subclass) naming the file when it is missing, unreadable,
    not UTF-8, or a JSONL line is not an object with a string "text".
    """
    p = Path(path)
    if not p.is_file():
        raise error(f"{p}: text file not found")
    try:
        raw = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{p}: not UTF-8 text ({e})") from None
    except OSError as e:
        raise error(f"{p}: cannot be read ({e.strerror})") from None
    if p.suffix.lower() != ".jsonl":
        return raw
    texts = []
    for k, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise error(f"{p}:{k}: not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
            raise error(f"{p}:{k}: expected an object with a string \"text\" field")
        texts.append(rec["text"])
    return "\n\n".join(texts)


def load_text(text, error=PruneError) -> str:
    """`text` itself, or the contents of the file it names (see `looks_like_path`)."""
    return read_text_file(text, error) if looks_like_path(text) else text


def random_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> list[torch.Tensor]:
    """`nsamples` windows [1, seqlen] of the token stream ids [n] with uniformly random starts (seeded)."""
    n = ids.numel()
    gen = torch.Generator().manual_seed(int(seed))
    starts = torch.randint(0, n - seqlen + 1, (nsamples,), generator=gen)
    return [ids[s : s + seqlen].reshape(1, seqlen).clone() for s in starts.tolist()]


def calibration_samples(calibration, tokenizer, *, nsamples: int, seqlen: int, seed: int) -> list[torch.Tensor]:
    """Token-id samples [1, seqlen] (int64) for calibration.

    `calibration`: a path to a text/JSONL file, a str of text, or a list of token-id tensors (used
    as given: each becomes one sample of its own length, `nsamples` and `seqlen` ignored). Text is
    tokenized once, without special tokens, and `nsamples` random windows are drawn with `seed`.
    """
    if nsamples < 1 or seqlen < 1:
        raise PruneError(f"nsamples and seqlen must be positive (got nsamples={nsamples}, seqlen={seqlen})")
    if isinstance(calibration, (list, tuple)):
        if not calibration:
            raise PruneError("calibration: an empty list of token-id tensors")
        out = []
        for k, t in enumerate(calibration):
            t = torch.as_tensor(t)
            if t.dtype not in (torch.int64, torch.int32) or t.numel() == 0 or t.dim() > 2 or (t.dim() == 2 and t.shape[0] != 1):
                raise PruneError(f"calibration sample {k}: expected a non-empty 1-D (or [1, n]) integer tensor of token ids, "
                                 f"got {t.dtype} {list(t.shape)}")
            out.append(t.reshape(1, -1).long())
        return out
    where = str(calibration) if looks_like_path(calibration) else "calibration text"
    text = load_text(calibration)
    if not text.strip():
        raise PruneError(f"{where}: empty (calibration needs at least {seqlen} tokens)")
    if tokenizer is None:
        raise PruneError(f"{where}: no tokenizer to turn it into tokens (pass calibration as token-id tensors, "
                         "or give a model folder that has tokenizer files)")
    ids = torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.int64)
    if ids.numel() < seqlen:
        raise PruneError(f"{where}: {ids.numel()} tokens, shorter than one sample of seqlen={seqlen} "
                         "(give more text or a smaller seqlen)")
    return random_windows(ids, nsamples, seqlen, seed)
