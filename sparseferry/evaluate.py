"""`sparseferry eval`: perplexity on a text, so users see what pruning cost them.

Sliding windows, as in the HuggingFace perplexity guide ("strided" evaluation): windows of `seqlen`
tokens start every `stride` tokens; the first window scores all its tokens (but its first, which has
no context), every later one only its last `stride` tokens (the ones not scored before), each with
up to seqlen - stride tokens of context. Every token but the first is scored exactly once:

    window k covers tokens [k*stride, min(k*stride + seqlen, n)) and scores the new ones
    perplexity = exp(sum of their negative log-likelihoods / their count)

stride == seqlen gives disjoint windows (faster, less context, higher perplexity).

Works on a dense HuggingFace folder, a pruned one (--save-dense), a sparseferry checkpoint (detected
by its sparseferry.json; run by the streaming runtime under `budget`), or a model in memory. HF folders
are run in their stored dtype, as the runtime runs a checkpoint, so the two give the same numbers.
"""
from __future__ import annotations

import math
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from .errors import SparseferryError
from .store import MANIFEST


class EvalError(SparseferryError):
    """Perplexity cannot be computed with these arguments, on this model or this text."""


def windows(n: int, seqlen: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, scored) of every window over n tokens: tokens [begin, end) go in, the last
    `scored` positions' next-token predictions are scored (scored <= end - begin - 1)."""
    out, prev_end = [], 0
    for begin in range(0, max(n - 1, 1), stride):
        end = min(begin + seqlen, n)
        out.append((begin, end, min(end - prev_end, end - begin - 1)))
        prev_end = end
        if end == n:
            break
    return out


def window_nll(logits: torch.Tensor, ids: torch.Tensor, scored: int) -> torch.Tensor:
    """Negative log-likelihoods [scored] of the last `scored` tokens of ids [L] given logits [L, V]
    (position t predicts token t+1), computed in fp32."""
    logp = torch.log_softmax(logits[-scored - 1 : -1].float(), dim=-1)  # [scored, V]
    return -logp.gather(1, ids[-scored:, None]).squeeze(1)


def _max_positions(config) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        v = getattr(config, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def _open(model_or_dir, tokenizer, budget):
    """(model, tokenizer, close) for a folder or an in-memory model."""
    if isinstance(model_or_dir, nn.Module):
        return model_or_dir.eval(), tokenizer, lambda: None
    path = Path(model_or_dir)
    if not path.is_dir():
        raise EvalError(f"{path}: no such folder")
    if tokenizer is None:
        from transformers import AutoTokenizer

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise EvalError(f"{path}: no usable tokenizer files ({e}); pass tokenizer=") from None
    if (path / MANIFEST).is_file():
        from .runtime import load

        model = load(path, device="cpu", memory_budget=budget, storage="host")
        return model.eval(), tokenizer, model.sparseferry.close
    from transformers import AutoModelForCausalLM

    from .hf import read_config_dict

    read_config_dict(path)  # a clear error for a folder without config.json
    if budget is not None:
        from .runtime.budget import format_bytes, parse_budget

        limit = parse_budget(budget)
        size = sum(f.stat().st_size for f in path.glob("*.safetensors")) or sum(f.stat().st_size for f in path.glob("*.bin"))
        if size > limit:
            raise EvalError(f"{path}: a HuggingFace folder is loaded whole ({format_bytes(size)}), over the budget of "
                            f"{format_bytes(limit)}; convert it (`sparseferry convert`) to evaluate it streamed under a budget")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(path, dtype="auto")
    return model.eval(), tokenizer, lambda: None


def perplexity(model_or_dir, text, *, seqlen: int = 1024, stride: int = 512, tokenizer=None,
               max_windows: int | None = None, budget=None, progress: bool = True) -> dict:
    """Sliding-window perplexity of a causal LM on `text` (see the module docstring).

    Args:
        model_or_dir: a HF folder (dense or pruned), a sparseferry checkpoint folder, or an in-memory
            causal LM (then `tokenizer` is required).
        text: the text, or a path (`Path`, or a str naming a file) to a plain-text or JSONL ("text") file.
        seqlen: tokens per window, at most the model's context length.
        stride: new tokens per window, 1 <= stride <= seqlen.
        tokenizer: overrides the folder's tokenizer. The text is tokenized whole, with the tokenizer's
            default special tokens (e.g. a leading BOS).
        max_windows: evaluate only the first windows (a quick estimate).
        budget: memory budget of a sparseferry checkpoint ("2GiB", bytes, "30%"); for a HF folder only
            checked against its size (it is loaded whole).
    Returns:
        {"ppl", "nll" (mean, nats/token), "tokens" (scored), "windows", "seqlen", "stride", "seconds"}.
    Raises:
        EvalError (bad arguments, text too short), CheckpointError, BudgetError: all SparseferryError.
    """
    from .prune.samples import load_text

    if seqlen < 2 or not 1 <= stride <= seqlen:
        raise EvalError(f"need seqlen >= 2 and 1 <= stride <= seqlen (got seqlen={seqlen}, stride={stride})")
    if max_windows is not None and max_windows < 1:
        raise EvalError(f"max_windows must be at least 1 (got {max_windows})")
    if isinstance(model_or_dir, nn.Module) and tokenizer is None:
        raise EvalError("an in-memory model needs tokenizer=")
    text = load_text(text, error=EvalError)
    if not text.strip():
        raise EvalError("the evaluation text is empty")
    t0 = time.perf_counter()
    model, tokenizer, close = _open(model_or_dir, tokenizer, budget)
    try:
        limit = _max_positions(model.config) if hasattr(model, "config") else None
        if limit is not None and seqlen > limit:
            raise EvalError(f"seqlen {seqlen} exceeds the model's context of {limit} tokens (pass --seqlen {limit} or less)")
        ids = torch.tensor(tokenizer(text, verbose=False)["input_ids"], dtype=torch.int64)  # [n]
        if ids.numel() < 2:
            raise EvalError(f"the evaluation text has {ids.numel()} token(s); perplexity needs at least 2")
        wins = windows(ids.numel(), seqlen, stride)[:max_windows]
        from tqdm import tqdm

        nll_sum, count = 0.0, 0
        with torch.no_grad():
            for begin, end, scored in tqdm(wins, desc="perplexity", unit="window", disable=not progress):
                x = ids[begin:end]
                logits = model(input_ids=x[None], use_cache=False).logits[0]  # [L, V]
                nll = window_nll(logits, x, scored)
                nll_sum += float(nll.double().sum())
                count += scored
    finally:
        close()
    mean = nll_sum / count
    return {"ppl": math.exp(mean), "nll": mean, "tokens": count, "windows": len(wins), "seqlen": seqlen,
            "stride": stride, "seconds": time.perf_counter() - t0}


__all__ = ["EvalError", "perplexity", "windows", "window_nll"]
