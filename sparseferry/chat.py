"""`sparseferry chat`: an interactive terminal chat over the same batcher as the server.

Each turn goes through the checkpoint's chat template with the whole conversation so far; the
reply streams token by token, followed by the summary line of `generate`. Input: one line is one
message; a line `\"\"\"` starts a multi-line message ended by another `\"\"\"` line; a line ending in
a backslash continues on the next. Commands: `/reset` forgets the conversation, `/exit` (or EOF) quits.
"""
from __future__ import annotations

import sys
from typing import Callable, Iterable, TextIO

from .errors import SparseferryError
from .runtime.budget import format_bytes

FENCE = '"""'


def summary_line(s: dict) -> str:
    """The line `generate` prints after a run."""
    return (f"prefill {s['prefill_s']:.2f} s | decode {s['decode_tokens_per_s'] or 0:.2f} tok/s | "
            f"read {format_bytes(s['bytes_read_per_token'] or 0)}/token | I/O wait {s['io_wait_s']:.2f} s, "
            f"decompress {s['decompress_s']:.2f} s, compute {s['compute_s']:.2f} s | peak RSS {format_bytes(s['peak_rss_bytes'])}")


def read_messages(lines: Iterable[str], prompt: Callable[[str], None]) -> Iterable[str]:
    """Messages from input lines: single lines, backslash continuations and \"\"\"-fenced blocks."""
    it = iter(lines)
    prompt(">>> ")
    for line in it:
        line = line.rstrip("\n")
        if line.strip() == FENCE:
            block = []
            prompt("... ")
            for inner in it:
                inner = inner.rstrip("\n")
                if inner.strip() == FENCE:
                    break
                block.append(inner)
                prompt("... ")
            msg = "\n".join(block)
        else:
            parts = []
            while line.endswith("\\"):
                parts.append(line[:-1])
                prompt("... ")
                line = next(it, "").rstrip("\n")
            parts.append(line)
            msg = "\n".join(parts)
        if msg.strip():
            yield msg
        prompt(">>> ")


class ChatSession:
    """A conversation over a loaded model: `reply(text, on_text)` streams the answer and remembers both turns."""

    def __init__(self, model, tokenizer, *, max_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int = 0, system: str | None = None):
        from .serve.batcher import Batcher

        if not getattr(tokenizer, "chat_template", None):
            raise SparseferryError("this checkpoint's tokenizer has no chat template (tokenizer_config.json 'chat_template')")
        self.tokenizer, self.system = tokenizer, system
        self.max_tokens, self.temperature, self.top_p, self.seed = max_tokens, temperature, top_p, seed
        self.batcher = Batcher(model, tokenizer, max_batch=1, keep_pass_records=True)
        self.messages: list[dict] = []

    def reset(self) -> None:
        self.messages = []

    def reply(self, text: str, on_text: Callable[[str], None]) -> tuple[str, dict]:
        """(the reply, the engine summary of this turn)."""
        from .serve.batcher import Event, Request
        from .serve.sampling import SamplingParams

        msgs = ([{"role": "system", "content": self.system}] if self.system else []) + self.messages
        msgs.append({"role": "user", "content": text})
        prompt = self.tokenizer(self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False),
                                add_special_tokens=False)["input_ids"]
        room = self.batcher.max_tokens_total - len(prompt)
        if room < 1:
            raise SparseferryError(f"the conversation ({len(prompt)} tokens) fills the context of "
                                   f"{self.batcher.max_tokens_total} tokens: /reset to start over")
        pieces, error = [], []

        def sink(ev: Event):
            if ev.kind == "error":
                error.append(ev.text)
            elif ev.text:
                pieces.append(ev.text)
                on_text(ev.text)

        params = SamplingParams(max_tokens=min(self.max_tokens, room), temperature=self.temperature, top_p=self.top_p,
                                seed=self.seed)
        self.batcher.engine.reset_stats()
        self.batcher.submit(Request(prompt=prompt, params=params, sink=sink))
        self.batcher.run_until_idle()
        if error:
            raise SparseferryError(error[0])
        answer = "".join(pieces)
        self.messages += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
        return answer, self.batcher.engine.summary()


def run_chat(checkpoint, *, budget=None, storage: str = "disk", device: str = "cpu", max_tokens: int = 256,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, system: str | None = None,
             stdin: TextIO | None = None, stdout: TextIO | None = None, stderr: TextIO | None = None) -> None:
    """The interactive loop (reads `stdin` until EOF or /exit)."""
    from .runtime import load, load_tokenizer

    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    tokenizer = load_tokenizer(checkpoint)
    model = load(checkpoint, device=device, memory_budget=budget, storage=storage)
    try:
        session = ChatSession(model, tokenizer, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                              system=system)
        print(f"[{model.sparseferry.plan.summary()}]", file=stderr)
        print('type a message (""" for several lines, /reset, /exit)', file=stderr)
        tty = stdin.isatty()

        def prompt(p):
            if tty:
                stdout.write(p)
                stdout.flush()

        for msg in read_messages(stdin, prompt):
            cmd = msg.strip()
            if cmd == "/exit":
                break
            if cmd == "/reset":
                session.reset()
                print("[conversation reset]", file=stderr)
                continue

            def show(piece):
                stdout.write(piece)
                stdout.flush()
            _, summary = session.reply(msg, show)
            stdout.write("\n")
            stdout.flush()
            print(summary_line(summary), file=stderr, flush=True)
    finally:
        model.sparseferry.close()
