"""sparseferry: run LLMs larger than memory by streaming bitmap-compressed sparse weights.

Offline:  `prune` (dense HF folder -> sparse checkpoint), `convert` (HF folder -> sparseferry checkpoint).
Runtime:  `load` (a HF-like causal LM that streams layers under a memory budget), `load_tokenizer`.

The functions are bound here after their modules are imported, so `sparseferry.convert` and
`sparseferry.prune` are always the functions; the modules stay importable by their full names
(`from sparseferry.prune import render_report`).
"""
from .convert import convert
from .demo import ensure_demo_model
from .errors import SparseferryError
from .format import BitmapTensor, decode, encode
from .prune import prune
from .runtime import load, load_tokenizer
from .store import open_checkpoint

__version__ = "0.1.0"

__all__ = ["BitmapTensor", "SparseferryError", "__version__", "convert", "decode", "encode", "ensure_demo_model",
           "load", "load_tokenizer", "open_checkpoint", "prune"]
