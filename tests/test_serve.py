"""`sparseferry serve`: continuous batching and the OpenAI-compatible HTTP surface.

The oracle is transformers' own `generate` on the same dense weights: every sequence of a batched
step, whatever else runs beside it, produces the tokens the dense model gives it alone. The HTTP
tests start the server on 127.0.0.1 (a free port) and drive it with the official `openai` client
(sync and async) and with plain HTTP.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import openai
import pytest
import torch
from conftest import ARCHS, make_checkpoint

import sparseferry
from sparseferry.runtime import BudgetError
from sparseferry.serve import Batcher, Request, RequestTooLarge, SamplingParams
from sparseferry.serve.server import ServerThread

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def streamed_model(ckpt):
    """The checkpoint loaded at its minimum budget: every decoder layer read from disk at every step."""
    try:
        sparseferry.load(ckpt, memory_budget=1)
    except BudgetError as e:
        return sparseferry.load(ckpt, memory_budget=e.minimum_bytes)
    raise AssertionError("a 1-byte budget was accepted")


def oracle(dense, prompt: list[int], n: int, eos: int | None = None) -> list[int]:
    """transformers' greedy continuation on the dense weights (up to and including EOS)."""
    out = dense.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    return out[: out.index(eos) + 1] if eos is not None and eos in out else out


def run(batcher, prompts, params):
    reqs = [batcher.submit(Request(prompt=p, params=params(i), sink=lambda ev: None)) for i, p in enumerate(prompts)]
    batcher.run_until_idle()
    return reqs


PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [40, 50], list(range(60, 90)), [5]]


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_greedy_equals_dense_alone_and_each_layer_is_read_once_per_step(arch, tmp_path):
    ckpt, dense = make_checkpoint(arch, tmp_path, dtype=torch.float32)
    model = streamed_model(ckpt)
    try:
        pipeline = model.sparseferry.pipeline
        b = Batcher(model, sparseferry.load_tokenizer(ckpt), max_batch=4, prefill_chunk=7)
        uses0 = pipeline.stats.uses
        reqs = run(b, PROMPTS, lambda i: SamplingParams(max_tokens=10, temperature=0))
        for p, r in zip(PROMPTS, reqs):
            assert r.generated == oracle(dense, p, 10, eos=None)[: len(r.generated)]
            assert r.finish_reason == "length" or r.generated[-1] in b.eos
        generated = sum(len(r.generated) for r in reqs)
        assert max(s.batch for s in b.stats.recent) == 4 and b.stats.steps < generated  # steps were shared
        assert pipeline.stats.uses - uses0 == b.stats.steps * len(model.sparseferry.plan.streamed)  # one read per step
        solo = Batcher(model, sparseferry.load_tokenizer(ckpt), max_batch=1)
        for p in PROMPTS:
            run(solo, [p], lambda i: SamplingParams(max_tokens=10, temperature=0))
        assert solo.stats.bytes_read > 0
        assert b.stats.bytes_read / generated < 0.6 * solo.stats.bytes_read / solo.stats.generated_tokens
    finally:
        model.sparseferry.close()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny fp32 Llama with a 2048-token context and a chat template."""
    tmp = tmp_path_factory.mktemp("serve")
    folder, dense = make_checkpoint("llama", tmp, dtype=torch.float32, max_position_embeddings=2048)
    tok = sparseferry.load_tokenizer(folder)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(folder)
    return folder, dense


def test_seeded_sampling_is_the_same_alone_and_batched(ckpt):
    folder, _ = ckpt
    model = streamed_model(folder)
    tok = sparseferry.load_tokenizer(folder)
    try:
        def params(i):
            return SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, top_k=50, seed=1234 + i)
        alone = [run(Batcher(model, tok, max_batch=1), [p], lambda _, i=i: params(i))[0].generated
                 for i, p in enumerate(PROMPTS)]
        batched = [r.generated for r in run(Batcher(model, tok, max_batch=4), PROMPTS, params)]
        assert batched == alone
        other_seed = run(Batcher(model, tok), [PROMPTS[2]], lambda i: params(99))[0].generated
        assert other_seed != alone[2]
    finally:
        model.sparseferry.close()


def test_long_prompt_is_prefilled_in_chunks_while_others_decode(ckpt):
    folder, dense = ckpt
    model = streamed_model(folder)
    try:
        b = Batcher(model, sparseferry.load_tokenizer(folder), max_batch=2, prefill_chunk=8)
        short = b.submit(Request(prompt=[7, 8], params=SamplingParams(max_tokens=12, temperature=0), sink=lambda e: None))
        b.step()
        b.step()
        long_prompt = list(range(3, 83))  # 80 tokens: 10 chunks of 8
        seen = []
        long = b.submit(Request(prompt=long_prompt, params=SamplingParams(max_tokens=4, temperature=0),
                                sink=lambda e: seen.append(len(short.generated))))
        b.run_until_idle()
        assert short.generated == oracle(dense, [7, 8], 12)
        assert long.generated == oracle(dense, long_prompt, 4)
        assert max(s.tokens for s in b.stats.recent) <= 8 + 1  # a chunk plus the decoding sequence
        assert seen[0] >= 10  # the short request kept decoding while the long prompt was read
    finally:
        model.sparseferry.close()


def test_kv_budget_holds_requests_back_instead_of_exceeding_it(ckpt):
    folder, dense = ckpt
    model = streamed_model(folder)
    tok = sparseferry.load_tokenizer(folder)
    try:
        probe = Batcher(model, tok)
        per_seq = (10 + 8) * probe.kv.bytes_per_token
        b = Batcher(model, tok, max_batch=8, kv_budget=2 * per_seq)  # room for two sequences of 18 tokens
        prompts = [list(range(i, i + 10)) for i in (3, 20, 40, 60, 80)]
        reqs = run(b, prompts, lambda i: SamplingParams(max_tokens=8, temperature=0))
        assert b.stats.max_active == 2 and b.stats.max_reserved <= b.kv_budget
        assert [r.generated for r in reqs] == [oracle(dense, p, 8) for p in prompts]
        assert b.reserved == 0
        with pytest.raises(RequestTooLarge, match="KV-cache budget of 36 tokens"):
            b.submit(Request(prompt=list(range(30)), params=SamplingParams(max_tokens=7), sink=lambda e: None))
        with pytest.raises(RequestTooLarge, match="maximum context length is 2048 tokens"):
            probe.submit(Request(prompt=[1] * 2040, params=SamplingParams(max_tokens=9), sink=lambda e: None))
    finally:
        model.sparseferry.close()


# -- over HTTP
@pytest.fixture(scope="module")
def server(ckpt):
    """The app on a free loopback port over the checkpoint at its minimum budget (all layers from disk)."""
    from sparseferry.serve.app import create_app

    model = streamed_model(ckpt[0])
    batcher = Batcher(model, sparseferry.load_tokenizer(ckpt[0]), max_batch=4, prefill_chunk=16)
    batcher.start()
    with ServerThread(create_app(batcher, model_name="tiny")) as s:
        s.batcher = batcher
        yield s
    batcher.stop()
    model.sparseferry.close()


def client(server, **kw):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, **kw)


def metric(server, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{server.url}/metrics").text
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == f"sparseferry_{name}" or s.name == f"sparseferry_{name}_total":
                return s.value
    raise KeyError(name)


def test_completions_streamed_text_equals_non_streamed_and_the_dense_model(server, ckpt):
    c = client(server)
    tok = server.batcher.tokenizer
    res = c.completions.create(model="tiny", prompt="Hello there", max_tokens=12, temperature=0)
    assert isinstance(res, openai.types.Completion)
    ids = tok("Hello there")["input_ids"]
    expect = oracle(ckpt[1], ids, 12, eos=tok.eos_token_id)
    assert res.choices[0].text == tok.decode(expect, skip_special_tokens=True)
    assert res.usage.prompt_tokens == len(ids) and res.usage.completion_tokens == len(expect)
    assert res.choices[0].finish_reason == ("length" if len(expect) == 12 else "stop")
    chunks = list(c.completions.create(model="tiny", prompt="Hello there", max_tokens=12, temperature=0, stream=True))
    assert all(isinstance(ch, openai.types.Completion) for ch in chunks)
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == res.choices[0].text
    assert chunks[-1].usage.completion_tokens == len(expect)


def test_chat_applies_the_template_streamed_equals_non_streamed(server, ckpt):
    c = client(server)
    tok = server.batcher.tokenizer
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    res = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0)
    assert isinstance(res, openai.types.chat.ChatCompletion)
    ids = tok("<|system|>be brief\n<|user|>hi\n<|assistant|>", add_special_tokens=False)["input_ids"]
    expect = oracle(ckpt[1], ids, 10, eos=tok.eos_token_id)
    assert res.choices[0].message.content == tok.decode(expect, skip_special_tokens=True)
    assert res.choices[0].message.role == "assistant"
    assert (res.usage.prompt_tokens, res.usage.completion_tokens) == (len(ids), len(expect))
    stream = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(isinstance(ch, openai.types.chat.ChatCompletionChunk) for ch in chunks)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == res.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == len(ids) + len(expect)


def test_stop_strings_end_the_text_before_them(server):
    c = client(server)
    full = c.completions.create(model="tiny", prompt="abc", max_tokens=24, temperature=0).choices[0].text
    stop = full[5:8]
    assert len(stop) == 3
    res = c.completions.create(model="tiny", prompt="abc", max_tokens=24, temperature=0, stop=[stop])
    assert res.choices[0].text == full[: full.index(stop)] and res.choices[0].finish_reason == "stop"
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="tiny", prompt="abc", max_tokens=24, temperature=0, stop=stop, stream=True) if ch.choices)
    assert streamed == res.choices[0].text


def test_logprobs(server):
    c = client(server)
    res = c.completions.create(model="tiny", prompt="xyz", max_tokens=5, temperature=0, logprobs=3)
    lp = res.choices[0].logprobs
    assert len(lp.token_logprobs) == res.usage.completion_tokens == len(lp.top_logprobs)
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 3 and chosen <= 0 and abs(max(top.values()) - chosen) < 1e-5  # greedy picks the top one
    chat = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "q"}], max_tokens=4,
                                     temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(t.top_logprobs) == 2 for t in content)


def test_async_clients_concurrently_streaming_and_not(server):
    async def main():
        c = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)

        async def plain(p):
            return (await c.completions.create(model="tiny", prompt=p, max_tokens=8, temperature=0)).choices[0].text

        async def streamed(p):
            out = []
            async for ch in await c.completions.create(model="tiny", prompt=p, max_tokens=8, temperature=0, stream=True):
                out.extend(x.text for x in ch.choices)
            return "".join(out)

        prompts = ["one", "two two", "three three three"]
        a = await asyncio.gather(*(plain(p) for p in prompts))
        b = await asyncio.gather(*(streamed(p) for p in prompts))
        await c.close()
        return a, b

    a, b = asyncio.run(main())
    assert a == b and len(set(a)) == 3


def test_bounded_load_no_request_lost_or_mixed_up(server, ckpt):
    """6 concurrent clients x 4 requests, distinct prompts: each answer is its own prompt's dense continuation."""
    tok = server.batcher.tokenizer
    prompts = [[(7 * k + j) % 250 + 1 for j in range(3 + k % 5)] for k in range(24)]
    expected = [tok.decode(oracle(ckpt[1], p, 6, eos=tok.eos_token_id), skip_special_tokens=True) for p in prompts]

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as h:
            async def worker(w):
                got = {}
                for k in range(w, 24, 6):
                    r = await h.post("/v1/completions", json={"prompt": prompts[k], "max_tokens": 6, "temperature": 0})
                    assert r.status_code == 200, r.text
                    got[k] = r.json()["choices"][0]["text"]
                return got
            results = await asyncio.gather(*(worker(w) for w in range(6)))
        return {k: v for d in results for k, v in d.items()}

    before = metric(server, "requests_finished")
    got = asyncio.run(main())
    assert [got[k] for k in range(24)] == expected
    assert metric(server, "requests_finished") - before == 24


def test_errors_are_openai_shaped(server):
    def post(body, raw=None):
        r = httpx.post(f"{server.url}/v1/completions", content=raw, json=None if raw else body,
                       headers={"content-type": "application/json"})
        return r.status_code, r.json()["error"]

    status, err = post(None, raw=b"{not json")
    assert status == 400 and err["type"] == "invalid_request_error" and "JSON" in err["message"]
    status, err = post({"prompt": "x", "max_tokens": 2, "frobnicate": 1})
    assert status == 400 and err["param"] == "frobnicate"
    assert post({"prompt": "x", "n": 2})[0] == 400
    assert post({"prompt": "x", "temperature": -1})[0] == 400
    status, err = post({"prompt": [1] * 2100, "max_tokens": 1})
    assert status == 400 and "maximum context length is 2048 tokens" in err["message"]
    assert err["code"] == "context_length_exceeded"
    status, err = post({"model": "other", "prompt": "x"})
    assert status == 404 and err["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client(server).chat.completions.create(model="tiny", messages=[], max_tokens=2)


def test_api_key_and_overload(ckpt):
    model = streamed_model(ckpt[0])
    from sparseferry.serve.app import create_app

    batcher = Batcher(model, sparseferry.load_tokenizer(ckpt[0]), max_batch=1, max_queue=1)
    gate, forward = threading.Event(), batcher._forward

    def held(*args, **kwargs):  # the running request holds the one batch slot until the test lets it go on
        gate.wait(60)
        return forward(*args, **kwargs)

    batcher._forward = held
    batcher.start()
    try:
        with ServerThread(create_app(batcher, model_name="tiny", api_key="sekret")) as s:
            with pytest.raises(openai.AuthenticationError):
                openai.OpenAI(base_url=f"{s.url}/v1", api_key="wrong", max_retries=0).models.list()
            assert httpx.get(f"{s.url}/v1/models").status_code == 401
            assert httpx.get(f"{s.url}/health").status_code == 200
            ok = openai.OpenAI(base_url=f"{s.url}/v1", api_key="sekret", max_retries=0)
            assert [m.id for m in ok.models.list()] == ["tiny"]
            auth = {"authorization": "Bearer sekret"}
            body = {"prompt": "long", "max_tokens": 1500, "stream": True, "temperature": 0}
            with httpx.Client(base_url=s.url, headers=auth, timeout=60) as h:
                with h.stream("POST", "/v1/completions", json=body) as running:  # takes the one batch slot
                    assert running.status_code == 200
                    for _ in range(1000):
                        if batcher.active:
                            break
                        time.sleep(0.01)
                    assert len(batcher.active) == 1 and not batcher.queue
                    with h.stream("POST", "/v1/completions", json=body) as queued:  # waits in the one queue place
                        assert queued.status_code == 200 and len(batcher.queue) == 1
                        r = h.post("/v1/completions", json=body)
                        assert r.status_code == 429 and r.headers["retry-after"] == "1"
                        assert r.json()["error"]["code"] == "server_overloaded"
                        gate.set()
                        assert next(running.iter_lines()).startswith("data: ")  # the held request goes on
                batcher.stop()  # a stopped engine: 503 with a retry hint
                assert h.get("/health").status_code == 503
                r = h.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
                assert r.status_code == 503 and r.headers["retry-after"] == "1"
    finally:
        gate.set()
        batcher.stop()
        model.sparseferry.close()


def test_client_disconnect_frees_its_slot(server):
    before_cancelled = metric(server, "requests_cancelled")
    before_tokens = metric(server, "generation_tokens")
    with httpx.Client(base_url=server.url, timeout=60) as h:
        with h.stream("POST", "/v1/completions",
                      json={"prompt": "go", "max_tokens": 1500, "stream": True, "temperature": 0}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
    for _ in range(600):  # at most ~60 s for the next step boundary
        if json.loads(httpx.get(f"{server.url}/health").text)["running"] == 0:
            break
        asyncio.run(asyncio.sleep(0.1))
    health = httpx.get(f"{server.url}/health").json()
    assert health["running"] == 0 and health["kv_cache_reserved_bytes"] == 0
    assert metric(server, "requests_cancelled") - before_cancelled == 1
    assert metric(server, "generation_tokens") - before_tokens < 1500


def test_metrics_in_prometheus_text(server):
    c = client(server)
    before = metric(server, "generation_tokens")
    res = c.completions.create(model="tiny", prompt="count me", max_tokens=7, temperature=0)
    assert metric(server, "generation_tokens") - before == res.usage.completion_tokens
    for name in ("tokens_per_second", "bytes_read_per_token", "io_wait_share", "batch_size", "queue_length",
                 "running_requests", "kv_cache_budget_bytes", "steps", "disk_read_bytes"):
        metric(server, name)
    assert metric(server, "bytes_read_per_token") > 0  # every layer is streamed from disk
    assert metric(server, "http_requests") >= 1


# -- the command line
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_command_states_the_kv_budget_and_answers(ckpt):
    import signal
    import subprocess
    import sys
    import time

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "sparseferry.cli", "serve", str(ckpt[0]), "--port", str(port),
                             "--budget", "80%", "--kv-budget", "1MiB", "--api-key", "k", "--model-name", "tiny"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(300):  # at most ~60 s to import and load
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.communicate()[1]
            time.sleep(0.2)
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)
        res = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                        temperature=0)
        assert res.usage.completion_tokens >= 1
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    kv_tokens = 2**20 // (2 * 2 * 2 * 16 * 4)  # layers x (K, V) x KV heads x head dim x fp32
    assert f"KV cache budget 1.00 MiB ({kv_tokens} tokens in flight" in err and "from disk" in err


def test_chat_command_streams_keeps_history_takes_multiline_and_resets(ckpt):
    import subprocess
    import sys

    folder, dense = ckpt
    tok = sparseferry.load_tokenizer(folder)

    def reply(prompt_text):
        ids = tok(prompt_text, add_special_tokens=False)["input_ids"]
        return tok.decode(oracle(dense, ids, 6, eos=tok.eos_token_id), skip_special_tokens=True)

    r1 = reply("<|user|>hello\n<|assistant|>")
    r2 = reply(f"<|user|>hello\n<|assistant|>{r1}\n<|user|>two\nlines\n<|assistant|>")
    stdin = 'hello\n"""\ntwo\nlines\n"""\n/reset\nhel\\\nlo\n/exit\nnever read\n'
    proc = subprocess.run([sys.executable, "-m", "sparseferry.cli", "chat", str(folder), "--max-tokens", "6",
                           "--budget", "80%"], input=stdin, capture_output=True, text=True, encoding="utf-8",
                          errors="replace", timeout=120, env={**__import__("os").environ, "PYTHONIOENCODING": "utf-8"})
    assert proc.returncode == 0, proc.stderr
    r3 = reply("<|user|>hel\nlo\n<|assistant|>")
    assert proc.stdout == f"{r1}\n{r2}\n{r3}\n"
    assert proc.stderr.count("tok/s | read ") == 3 and "[conversation reset]" in proc.stderr


def test_bench_serve_shares_reads_between_concurrent_requests(ckpt):
    from sparseferry.serve.bench import bench_serve, render_bench

    res = bench_serve(ckpt[0], budget="80%", clients=[1, 4], prompt_tokens=8, new_tokens=6, progress=False)
    one, four = res["points"]
    assert one["generated_tokens"] == 6 and four["generated_tokens"] == 24
    assert four["bytes_read_per_token"] < one["bytes_read_per_token"] / 2
    assert "| 4 |" in render_bench(res)


def test_empty_prompt_is_a_plain_400(server):
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "", "max_tokens": 2})
    assert r.status_code == 400 and "empty" in r.json()["error"]["message"] and r.json()["error"]["code"] is None


def test_a_failed_step_fails_its_requests_and_the_server_goes_on(server, monkeypatch):
    real = server.batcher._forward
    calls = []

    def broken_once(*a):
        if not calls:
            calls.append(1)
            raise RuntimeError("disk on fire")
        return real(*a)

    monkeypatch.setattr(server.batcher, "_forward", broken_once)
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "x", "max_tokens": 3, "temperature": 0})
    assert r.status_code == 500 and "disk on fire" in r.json()["error"]["message"]
    ok = httpx.post(f"{server.url}/v1/completions", json={"prompt": "x", "max_tokens": 3, "temperature": 0})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1
