"""The HTTP surface: an OpenAI-compatible FastAPI app over a running `Batcher`.

Each request is tokenised (completions: as is; chat: through the checkpoint's chat template),
checked against the context and the KV-cache budget, and submitted; the batcher thread pushes
events into an asyncio queue per request. Streaming responses are server-sent events ending in
`data: [DONE]`; a client that goes away cancels its request, which leaves the batch at the next
step boundary and frees its KV cache.
"""
from __future__ import annotations

import asyncio
import hmac
import json

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .batcher import AdmissionError, Batcher, InvalidRequest, NotRunning, Overloaded, Request as GenRequest
from .metrics import CONTENT_TYPE, Metrics
from .protocol import (ChatRequest, CompletionRequest, error_body, new_id, now, usage, validation_message)
from .sampling import SamplingParams

RETRY_AFTER_S = 1
DEFAULT_COMPLETION_TOKENS = 16  # /v1/completions without max_tokens (as OpenAI); chat: the rest of the context


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param=None, code=None,
                 headers=None):
        self.status, self.body, self.headers = status, error_body(message, type_, param, code), headers


def _admission_error(e: AdmissionError) -> APIError:
    if isinstance(e, Overloaded):
        return APIError(429, str(e), "rate_limit_error", code="server_overloaded",
                        headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(e, NotRunning):
        return APIError(503, str(e), "server_error", code="unavailable", headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(e, InvalidRequest):
        return APIError(400, str(e))
    return APIError(400, str(e), code="context_length_exceeded")


def create_app(batcher: Batcher, *, model_name: str, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="sparseferry", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = Metrics(batcher)
    tok = batcher.tokenizer
    created = now()

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return JSONResponse(e.body, status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        msg, param = validation_message(e.errors())
        return JSONResponse(error_body(msg, "invalid_request_error", param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        return JSONResponse(error_body(str(e.detail), "invalid_request_error"), status_code=e.status_code)

    @app.middleware("http")
    async def _count(request: Request, call_next):
        if api_key is not None and request.url.path.startswith("/v1/"):
            auth = request.headers.get("authorization", "")
            given = auth[7:] if auth.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(given.encode(), api_key.encode()):
                metrics.count(request.url.path, 401)
                return JSONResponse(error_body("invalid or missing API key (send 'Authorization: Bearer KEY')",
                                               "authentication_error", code="invalid_api_key"), status_code=401)
        response = await call_next(request)
        metrics.count(request.url.path, response.status_code)
        return response

    @app.get("/health")
    async def health():
        body = {"status": "ok" if batcher.running else "stopped", "running": len(batcher.active),
                "queued": len(batcher.queue), "kv_cache_reserved_bytes": batcher.reserved}
        return JSONResponse(body, status_code=200 if batcher.running else 503)

    @app.get("/metrics")
    async def get_metrics():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "sparseferry"}]}

    def _check_model(name):
        if name is not None and name != model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")

    def _params(body, prompt_len: int, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        if max_tokens is None:
            room = batcher.max_tokens_total - prompt_len
            max_tokens = min(DEFAULT_COMPLETION_TOKENS, room) if isinstance(body, CompletionRequest) else room
            if max_tokens < 1:
                try:
                    batcher.check(prompt_len, 1)  # raises, stating the limit
                except AdmissionError as e:
                    raise _admission_error(e) from None
        return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                              seed=body.seed, stop=body.stop, logprobs=logprobs)

    def _submit(prompt: list[int], params: SamplingParams):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def sink(ev):
            try:
                loop.call_soon_threadsafe(queue.put_nowait, ev)
            except RuntimeError:  # the event loop is gone (shutdown)
                pass

        try:
            req = batcher.submit(GenRequest(prompt=prompt, params=params, sink=sink))
        except AdmissionError as e:
            raise _admission_error(e) from None
        return req, queue

    async def _events(req, queue):
        """The request's events until it is done; cancels it if the consumer stops early (client gone)."""
        try:
            while True:
                ev = await queue.get()
                yield ev
                if ev.kind in ("done", "error"):
                    return
        finally:
            if req.finish_reason is None:
                batcher.cancel(req)

    async def _collect(request: Request, req, queue) -> tuple[str, list, str]:
        """Non-streaming: every event, or a cancellation as soon as the client disconnects."""
        async def gather():
            text, events = [], []
            async for ev in _events(req, queue):
                if ev.kind == "error":
                    raise APIError(500, ev.text, "server_error")
                text.append(ev.text)
                events.append(ev)
            return "".join(text), events

        task = asyncio.ensure_future(gather())
        while not task.done():
            await asyncio.wait({task}, timeout=0.5)
            if not task.done() and await request.is_disconnected():
                task.cancel()
                batcher.cancel(req)
                raise APIError(499, "client disconnected")
        text, events = task.result()
        return text, events, req.finish_reason

    def _token_str(t: int) -> str:
        return tok.decode([t], skip_special_tokens=False)

    def _chat_logprobs(ev) -> dict:
        def item(t, lp):
            s = _token_str(t)
            return {"token": s, "logprob": lp, "bytes": list(s.encode())}
        return {**item(ev.token, ev.logprobs.logprob), "top_logprobs": [item(t, lp) for t, lp in ev.logprobs.top]}

    def _completion_logprobs(events) -> dict:
        toks = [e for e in events if e.token is not None]
        offsets, pos = [], 0
        for e in toks:
            offsets.append(pos)
            pos += len(e.text)
        return {"tokens": [_token_str(e.token) for e in toks], "token_logprobs": [e.logprobs.logprob for e in toks],
                "top_logprobs": [_top_dict(e.logprobs.top) for e in toks], "text_offset": offsets}

    def _top_dict(top) -> dict:
        """{token text: logprob}; a token whose text another already has (e.g. partial UTF-8) is keyed by its vocab entry."""
        out = {}
        for t, lp in top:
            key = _token_str(t)
            out[tok.convert_ids_to_tokens(t) if key in out else key] = lp
        return out

    def _sse(obj) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    async def _stream(req, queue, chunk, finish_chunk, include_usage: bool, first=None):
        """SSE body: `chunk(ev)` per token event with text or logprobs, `finish_chunk(reason, usage)` at the end."""
        if first is not None:
            yield _sse(first)
        async for ev in _events(req, queue):
            if ev.kind == "error":
                yield _sse(error_body(ev.text, "server_error"))
                break
            if ev.text or ev.logprobs is not None:
                yield _sse(chunk(ev))
            if ev.kind == "done":
                u = usage(len(req.prompt), len(req.generated))
                yield _sse(finish_chunk(ev.finish_reason, u))
                if include_usage:
                    yield _sse(finish_chunk(None, u, empty=True))
        yield "data: [DONE]\n\n"

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        _check_model(body.model)
        prompt = body.prompt if isinstance(body.prompt, list) else tok(body.prompt)["input_ids"]
        if isinstance(body.prompt, list) and any(not 0 <= t < len(tok) for t in prompt):
            raise APIError(400, f"prompt token ids must be in [0, {len(tok)})", param="prompt")
        req, queue = _submit(prompt, _params(body, len(prompt), body.max_tokens, body.logprobs))
        cid, ts = new_id("cmpl"), now()
        base = {"id": cid, "object": "text_completion", "created": ts, "model": model_name}
        if body.stream:
            def chunk(ev):
                lp = _completion_logprobs([ev]) if ev.logprobs is not None else None
                return {**base, "choices": [{"index": 0, "text": ev.text, "logprobs": lp, "finish_reason": None}]}

            def finish(reason, u, empty=False):
                choices = [] if empty else [{"index": 0, "text": "", "logprobs": None, "finish_reason": reason}]
                return {**base, "choices": choices, "usage": u}
            return StreamingResponse(_stream(req, queue, chunk, finish, body.include_usage), media_type="text/event-stream")
        text, events, reason = await _collect(request, req, queue)
        lp = _completion_logprobs(events) if body.logprobs is not None else None
        return {**base, "choices": [{"index": 0, "text": text, "logprobs": lp, "finish_reason": reason}],
                "usage": usage(len(prompt), len(req.generated))}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        _check_model(body.model)
        if not getattr(tok, "chat_template", None):
            raise APIError(400, "this checkpoint's tokenizer has no chat template; use /v1/completions", param="messages")
        msgs = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # noqa: BLE001 - the template itself rejects the conversation
            raise APIError(400, f"the chat template rejected the messages: {e}", param="messages") from None
        prompt = tok(text, add_special_tokens=False)["input_ids"]
        k = (body.top_logprobs or 0) if body.logprobs else None
        req, queue = _submit(prompt, _params(body, len(prompt), body.max_completion_tokens or body.max_tokens, k))
        cid, ts = new_id("chatcmpl"), now()
        base = {"id": cid, "object": "chat.completion.chunk" if body.stream else "chat.completion", "created": ts,
                "model": model_name}
        if body.stream:
            def chunk(ev):
                lp = {"content": [_chat_logprobs(ev)]} if ev.logprobs is not None else None
                return {**base, "choices": [{"index": 0, "delta": {"content": ev.text}, "logprobs": lp,
                                             "finish_reason": None}]}

            def finish(reason, u, empty=False):
                choices = [] if empty else [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": reason}]
                return {**base, "choices": choices, "usage": u}
            first = {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                          "finish_reason": None}]}
            return StreamingResponse(_stream(req, queue, chunk, finish, body.include_usage, first=first),
                                     media_type="text/event-stream")
        text, events, reason = await _collect(request, req, queue)
        lp = {"content": [_chat_logprobs(e) for e in events if e.token is not None]} if body.logprobs else None
        return {**base, "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": lp,
                                     "finish_reason": reason}], "usage": usage(len(prompt), len(req.generated))}

    return app
