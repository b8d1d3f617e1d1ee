"""Per-request sampling: temperature, top-k, top-p, a seeded generator, and log-probabilities.

Every request samples from its own logits row with its own `torch.Generator`, so what it draws
does not depend on the other sequences in the batch: the same request with the same seed gives
the same tokens alone or batched. temperature 0 is greedy (argmax).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None  # None: a fresh random seed
    stop: list[str] = field(default_factory=list)  # stop strings (not included in the output)
    logprobs: int | None = None  # None: none; k >= 0: the sampled token's log-probability and the top k

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


@dataclass
class TokenLogprobs:
    logprob: float  # of the sampled token under the model's distribution (before temperature / top-k / top-p)
    top: list[tuple[int, float]]  # the k most likely tokens and their log-probabilities


class Sampler:
    """Draws the next token of one request from its logits row."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.seed = params.seed if params.seed is not None else random.SystemRandom().randrange(2**63)
        self.generator = torch.Generator().manual_seed(self.seed)

    def __call__(self, logits: torch.Tensor) -> tuple[int, TokenLogprobs | None]:
        """logits: [vocab] (any float dtype) -> (token id, log-probabilities if asked)."""
        p = self.params
        logits = logits.float().cpu()  # the generator lives on the CPU, whatever the device
        if p.temperature == 0:
            token = int(torch.argmax(logits))
        else:
            scores = logits / p.temperature
            if p.top_k and p.top_k < scores.numel():
                kth = torch.topk(scores, p.top_k).values[-1]
                scores = scores.masked_fill(scores < kth, float("-inf"))
            if p.top_p < 1.0:
                sorted_scores, order = torch.sort(scores, descending=True)
                cum = torch.softmax(sorted_scores, dim=-1).cumsum(-1)
                drop = cum - torch.softmax(sorted_scores, dim=-1) >= p.top_p  # keep the smallest set reaching top_p
                scores = scores.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
            probs = torch.softmax(scores, dim=-1)
            token = int(torch.multinomial(probs, 1, generator=self.generator))
        if p.logprobs is None:
            return token, None
        lp = torch.log_softmax(logits, dim=-1)
        top = []
        if p.logprobs:
            vals, ids = torch.topk(lp, min(p.logprobs, lp.numel()))
            top = [(int(i), float(v)) for i, v in zip(ids, vals)]
        return token, TokenLogprobs(logprob=float(lp[token]), top=top)
