"""Continuous batching over a streamed model: the step loop of the server.

One step is one forward pass of the transformers model over a packed row holding the new tokens
of every active sequence: one token for each decoding sequence, and up to `prefill_chunk` prompt
tokens shared by the sequences still reading their prompt (a long prompt is prefilled over several
steps, so it never stalls the others for its whole length). Each streamed layer is therefore read
once per step for all sequences. Requests join at a step boundary when a batch slot and KV-cache
room are free (admission control: the KV cache reserved by all sequences in flight never exceeds
`kv_budget`), and leave at the next boundary when they finish or are cancelled.

    while running:
        drop cancelled; admit from the queue while slots and KV room allow
        row = [prompt chunk or last token of each active sequence]
        logits = model(row, positions)        # each streamed layer read once
        for each sequence that has a next token: sample it (its own generator), emit text, finish?

The loop runs on one thread (`start`) or is driven by the caller (`run_until_idle`).
"""
from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import SparseferryError
from .kvcache import Segment, SequenceKV, StepLayout, kv_shape, use_batched_attention
from .sampling import Sampler, SamplingParams, TokenLogprobs
from .textstream import TextStream


class AdmissionError(SparseferryError):
    """A request that cannot be accepted (the server answers with an error status)."""


class RequestTooLarge(AdmissionError):
    """Prompt + max_tokens exceed the context length or the KV-cache budget."""


class InvalidRequest(AdmissionError):
    """A request that is malformed for generation (e.g. an empty prompt)."""


class Overloaded(AdmissionError):
    """The queue is full; try again later."""


class NotRunning(AdmissionError):
    """The batcher is stopped or failed."""


@dataclass
class Event:
    kind: str  # "token" (text may be ''), "done" (finish_reason set) or "error" (text = message)
    text: str = ""
    token: int | None = None
    logprobs: TokenLogprobs | None = None
    finish_reason: str | None = None  # "stop" (EOS or a stop string) / "length" / "cancelled"


_ids = itertools.count(1)


@dataclass(eq=False)
class Request:
    prompt: list[int]
    params: SamplingParams
    sink: Callable[[Event], None]  # called on the batcher thread; must not block
    id: int = field(default_factory=lambda: next(_ids))
    generated: list[int] = field(default_factory=list)
    prefilled: int = 0
    finish_reason: str | None = None
    t_submit: float = field(default_factory=time.perf_counter)
    t_first: float | None = None
    cancelled: bool = False
    kv: SequenceKV | None = None
    sampler: Sampler | None = None
    text: TextStream | None = None


@dataclass
class StepRecord:
    t_end: float
    seconds: float
    batch: int  # sequences in the step
    tokens: int  # positions computed (prompt chunks + one per decoding sequence)
    generated: int  # tokens sampled
    bytes_read: int  # from disk, during this step
    io_wait_s: float  # compute blocked waiting for a streamed layer


@dataclass
class BatcherStats:
    requests_finished: int = 0
    requests_cancelled: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    steps: int = 0
    step_seconds: float = 0.0
    bytes_read: int = 0
    io_wait_s: float = 0.0
    ttft_sum_s: float = 0.0
    ttft_count: int = 0
    max_active: int = 0
    max_reserved: int = 0
    recent: deque = field(default_factory=lambda: deque(maxlen=512))  # StepRecord


class Batcher:
    def __init__(self, model, tokenizer, *, max_batch: int = 8, kv_budget: int | None = None, prefill_chunk: int = 256,
                 max_queue: int = 64, keep_pass_records: bool = False):
        """model: from `sparseferry.load`; kv_budget: bytes of KV cache for all sequences in flight
        (default: `max_batch` sequences of the full context)."""
        if max_batch < 1 or prefill_chunk < 1 or max_queue < 0:
            raise SparseferryError("max_batch and prefill_chunk must be >= 1, max_queue >= 0")
        self.model, self.tokenizer = model, tokenizer
        self.engine = model.sparseferry
        use_batched_attention(model)
        self.kv = kv_shape(model.config, len(self.engine.layers), model.dtype)
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.context = next((getattr(cfg, k) for k in ("max_position_embeddings", "n_positions", "n_ctx")
                             if getattr(cfg, k, None)), None)
        self.max_batch, self.prefill_chunk, self.max_queue = max_batch, prefill_chunk, max_queue
        if kv_budget is None:
            if self.context is None:
                raise SparseferryError("the model's config states no context length: give a KV-cache budget")
            kv_budget = max_batch * self.context * self.kv.bytes_per_token
        if kv_budget < self.kv.bytes_per_token * 2:
            raise SparseferryError(f"KV-cache budget {kv_budget} bytes holds less than 2 tokens "
                                   f"({self.kv.bytes_per_token} bytes per token)")
        self.kv_budget = kv_budget
        self.eos = _eos_ids(model, tokenizer)
        self.keep_pass_records = keep_pass_records
        self.stats = BatcherStats()
        self.queue: deque[Request] = deque()
        self.active: list[Request] = []
        self.reserved = 0  # KV-cache bytes reserved by the active sequences
        self._cond = threading.Condition()
        self._layer_index: dict[int, int] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False

    # -- limits
    @property
    def max_tokens_total(self) -> int:
        """Prompt + completion tokens one sequence may have (context and KV budget)."""
        kv_tokens = self.kv_budget // self.kv.bytes_per_token
        return min(self.context, kv_tokens) if self.context else kv_tokens

    def plan_line(self) -> str:
        from ..runtime.budget import format_bytes

        return (f"KV cache budget {format_bytes(self.kv_budget)} ({self.kv_budget // self.kv.bytes_per_token} tokens "
                f"in flight, {format_bytes(self.kv.bytes_per_token)}/token), up to {self.max_batch} sequences per step, "
                f"prompts prefilled {self.prefill_chunk} tokens per step")

    def check(self, prompt_tokens: int, max_tokens: int) -> None:
        """RequestTooLarge unless a sequence of this size can ever run."""
        total = prompt_tokens + max_tokens
        if self.context and total > self.context:
            raise RequestTooLarge(f"This model's maximum context length is {self.context} tokens. However, you requested "
                                  f"{total} tokens ({prompt_tokens} in the prompt, {max_tokens} for the completion). "
                                  f"Please reduce the prompt or max_tokens.")
        if total * self.kv.bytes_per_token > self.kv_budget:
            raise RequestTooLarge(f"{total} tokens ({prompt_tokens} in the prompt, {max_tokens} for the completion) "
                                  f"exceed the KV-cache budget of {self.kv_budget // self.kv.bytes_per_token} tokens")

    # -- requests
    def submit(self, req: Request) -> Request:
        """Queue a request; it joins the batch at a step boundary. AdmissionError if it cannot."""
        if not req.prompt:
            raise InvalidRequest("the prompt is empty (at least one token is needed)")
        self.check(len(req.prompt), req.params.max_tokens)
        req.sampler = Sampler(req.params)
        req.text = TextStream(self.tokenizer, req.params.stop)
        with self._cond:
            if self._stopping:
                raise NotRunning("the server is shutting down")
            if len(self.queue) >= self.max_queue:
                raise Overloaded(f"{len(self.queue)} requests are waiting (the limit is {self.max_queue}); retry shortly")
            self.queue.append(req)
            self._cond.notify_all()
        return req

    def cancel(self, req: Request) -> None:
        """Stop a request: at once if queued, at the next step boundary if running (its KV cache is freed then)."""
        with self._cond:
            req.cancelled = True
            if req in self.queue:
                self.queue.remove(req)
                self.stats.requests_cancelled += 1

    # -- the loop
    def step(self) -> bool:
        """One step; False if there was nothing to do."""
        with self._cond:
            for r in [r for r in self.active if r.cancelled]:
                self._retire(r, "cancelled", emit=False)
            self._admit()
            batch = list(self.active)
        if not batch:
            return False
        tokens, positions, segments, rows, sampled, advance = [], [], [], [], [], []
        chunk_left = self.prefill_chunk
        for r in batch:
            if r.prefilled < len(r.prompt):  # still reading its prompt
                if chunk_left == 0:
                    continue
                t = min(len(r.prompt) - r.prefilled, chunk_left)
                chunk_left -= t
                new = r.prompt[r.prefilled:r.prefilled + t]
                advance.append((r, t))
                done = r.prefilled + t == len(r.prompt)
            else:
                new, done = [r.generated[-1]], True
            segments.append(Segment(r.kv, len(tokens), len(new)))
            positions.extend(range(r.kv.length, r.kv.length + len(new)))
            tokens.extend(new)
            if done:
                rows.append(len(tokens) - 1)
                sampled.append(r)
        t0 = time.perf_counter()
        ps = self.engine.pipeline.stats if self.engine.pipeline else None
        b0, w0 = (ps.bytes_read, ps.wait_s) if ps else (0, 0.0)
        try:
            logits = self._forward(tokens, positions, segments, rows)
        except Exception as e:  # noqa: BLE001 - a failed step fails its requests, not the server
            with self._cond:
                for r in batch:
                    self._retire(r, "error", emit=False)
                    r.sink(Event("error", text=f"{type(e).__name__}: {e}"))
            return True
        for r, t in advance:
            r.prefilled += t
        now = time.perf_counter()
        rec = StepRecord(t_end=now, seconds=now - t0, batch=len(segments), tokens=len(tokens), generated=len(sampled),
                         bytes_read=(ps.bytes_read - b0) if ps else 0, io_wait_s=(ps.wait_s - w0) if ps else 0.0)
        with self._cond:
            st = self.stats
            st.steps += 1
            st.step_seconds += rec.seconds
            st.bytes_read += rec.bytes_read
            st.io_wait_s += rec.io_wait_s
            st.generated_tokens += len(sampled)
            st.recent.append(rec)
            for r, row in zip(sampled, logits):
                self._emit_token(r, row, now)
        if not self.keep_pass_records:
            self.engine.passes.clear()
        return True

    def _forward(self, tokens, positions, segments, rows) -> torch.Tensor:
        dev = self.engine.device
        ids = torch.tensor([tokens], dtype=torch.long, device=dev)  # [1, N]: every sequence's new tokens
        pos = torch.tensor([positions], dtype=torch.long, device=dev)
        keep = torch.tensor(rows, dtype=torch.long, device=dev)
        with torch.inference_mode(), StepLayout(segments, self._layer_index):
            out = self.model(input_ids=ids, position_ids=pos, use_cache=False, logits_to_keep=keep)
        return out.logits[0]  # [len(rows), vocab]

    def _emit_token(self, r: Request, row: torch.Tensor, now: float) -> None:
        if r.cancelled:
            return
        token, lp = r.sampler(row)
        r.generated.append(token)
        if r.t_first is None:
            r.t_first = now
            self.stats.ttft_sum_s += now - r.t_submit
            self.stats.ttft_count += 1
        if token in self.eos:
            r.sink(Event("token", token=token, logprobs=lp))
            self._retire(r, "stop")
            return
        piece = r.text.push(token)
        r.sink(Event("token", text=piece, token=token, logprobs=lp))
        if r.text.stopped:
            self._retire(r, "stop")
        elif len(r.generated) >= r.params.max_tokens:
            self._retire(r, "length")

    def _admit(self) -> None:
        while self.queue and len(self.active) < self.max_batch:
            r = self.queue[0]
            need = (len(r.prompt) + r.params.max_tokens) * self.kv.bytes_per_token
            if self.reserved + need > self.kv_budget:
                break  # first come, first served: wait until enough KV cache is free
            self.queue.popleft()
            r.kv = SequenceKV(self.kv, len(r.prompt) + r.params.max_tokens, self.engine.device)
            self.reserved += r.kv.nbytes
            self.active.append(r)
            self.stats.prompt_tokens += len(r.prompt)
        self.stats.max_active = max(self.stats.max_active, len(self.active))
        self.stats.max_reserved = max(self.stats.max_reserved, self.reserved)

    def _retire(self, r: Request, reason: str, emit: bool = True) -> None:
        """Remove a running request and free its KV cache (called with the lock held)."""
        if r in self.active:
            self.active.remove(r)
            self.reserved -= r.kv.nbytes
        r.kv = None
        r.finish_reason = reason
        if reason == "cancelled":
            self.stats.requests_cancelled += 1
        else:
            self.stats.requests_finished += 1
        if emit:
            rest = r.text.finish()
            r.sink(Event("done", text=rest, finish_reason=reason))

    def idle(self) -> bool:
        with self._cond:
            return not self.queue and not self.active

    def run_until_idle(self) -> None:
        """Drive the loop on the calling thread until no request is queued or running."""
        while self.step():
            pass

    def start(self) -> None:
        """Run the loop on a background thread until `stop`."""
        self._thread = threading.Thread(target=self._run, name="sparseferry-batcher", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self.queue and not self.active:
                    self._cond.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as e:  # noqa: BLE001 - keep serving: fail what was in flight, not the loop
                with self._cond:
                    for r in list(self.queue) + list(self.active):
                        if r in self.active:
                            self._retire(r, "error", emit=False)
                        r.sink(Event("error", text=f"{type(e).__name__}: {e}"))
                    self.queue.clear()

    def stop(self) -> None:
        """Stop the loop; queued and running requests end with an error event."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        with self._cond:
            for r in list(self.queue) + list(self.active):
                if r in self.active:
                    self._retire(r, "error", emit=False)
                r.sink(Event("error", text="the server is shutting down"))
            self.queue.clear()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping


def _eos_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    gc = getattr(model, "generation_config", None)
    for v in (getattr(gc, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(v, int):
            ids.add(v)
        elif v:
            ids.update(int(x) for x in v)
    return ids
