"""sparseferry: run LLMs larger than memory by streaming bitmap-compressed sparse weights.

Offline:  `prune` (dense HF folder -> sparse checkpoint), `convert` (HF folder -> sparseferry checkpoint).
Runtime:  `load` (a HF-like causal LM that streams layers under a memory budget), `load_tokenizer`.

The functions are bound here after their modules are imported, so `sparseferry.convert` and
`sparseferry.prune` are always the functions; the modules stay importable by their full names
(`from sparseferry.prune import render_report`).
"""
import os as _os
import signal as _signal
import sys as _sys


def _exit_interrupted(signum, frame):  # noqa: ARG001 - Ctrl-C while the command's imports run
    _sys.stderr.write("sparseferry: interrupted\n")
    _os._exit(130)


# The console script imports this package (torch, transformers: seconds) before its own handler runs:
# only for it, Ctrl-C meanwhile exits 130 with one line instead of a traceback from deep in an import.
_CLI = _os.path.basename(_sys.argv[0] if _sys.argv else "") == "sparseferry"
_prev = _signal.signal(_signal.SIGINT, _exit_interrupted) if _CLI else None

from .convert import convert  # noqa: E402
from .demo import ensure_demo_model  # noqa: E402
from .errors import SparseferryError  # noqa: E402
from .format import BitmapTensor, decode, encode  # noqa: E402
from .prune import prune  # noqa: E402
from .runtime import load, load_tokenizer  # noqa: E402
from .store import open_checkpoint  # noqa: E402

if _CLI:
    _signal.signal(_signal.SIGINT, _prev)

__version__ = "0.1.0"

__all__ = ["BitmapTensor", "SparseferryError", "__version__", "convert", "decode", "encode", "ensure_demo_model",
           "load", "load_tokenizer", "open_checkpoint", "prune"]
