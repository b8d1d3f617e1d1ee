"""Starting the server: load the checkpoint, start the batcher, run uvicorn (or a background thread for tests)."""
from __future__ import annotations

import socket
import sys
import threading
from pathlib import Path

from ..errors import SparseferryError


def build(checkpoint, *, budget=None, kv_budget=None, max_batch: int = 8, prefill_chunk: int = 256, max_queue: int = 64,
          storage: str = "disk", device: str = "cpu", direct_io: bool = True, verify: bool = True,
          api_key: str | None = None, model_name: str | None = None):
    """(app, batcher): the checkpoint loaded under `budget`, a started batcher, the FastAPI app over it.

    kv_budget: bytes or a size string ('256MiB') bounding the KV cache of all sequences in flight
    (default: `max_batch` sequences of the full context).
    """
    from ..runtime import load, load_tokenizer, parse_budget

    try:
        from .app import create_app
    except ImportError as e:
        raise SparseferryError(f"the server needs FastAPI, uvicorn and prometheus-client ({e}): "
                               f"pip install 'sparseferry[serve]'") from None
    from .batcher import Batcher

    tokenizer = load_tokenizer(checkpoint)
    model = load(checkpoint, device=device, memory_budget=budget, storage=storage, direct_io=direct_io, verify=verify)
    try:
        kv = parse_budget(kv_budget, None) if kv_budget is not None else None
        batcher = Batcher(model, tokenizer, max_batch=max_batch, kv_budget=kv, prefill_chunk=prefill_chunk,
                          max_queue=max_queue)
    except Exception:
        model.sparseferry.close()
        raise
    batcher.start()
    app = create_app(batcher, model_name=model_name or Path(checkpoint).resolve().name, api_key=api_key)
    return app, batcher


def plan_line(batcher) -> str:
    return f"[{batcher.engine.plan.summary()}; {batcher.plan_line()}]"


def serve(checkpoint, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info", **kw) -> None:
    """Serve until interrupted (Ctrl-C / SIGTERM), then stop the batcher and release the model."""
    import uvicorn

    app, batcher = build(checkpoint, **kw)
    try:
        print(plan_line(batcher), file=sys.stderr, flush=True)
        try:
            uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level)).run()
        except KeyboardInterrupt:  # uvicorn re-raises the signal once it has shut down gracefully
            pass
    finally:
        batcher.stop()
        batcher.engine.close()


class ServerThread:
    """uvicorn in a background thread on a free loopback port (tests, benchmarks): `with ServerThread(app) as s: s.url`."""

    def __init__(self, app, host: str = "127.0.0.1"):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        for _ in range(500):  # at most ~10 s for uvicorn to start
            if self.server.started:
                return self
            self.thread.join(0.02)
        raise SparseferryError("the server did not start within 10 s")

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()
