"""sparseferry: run LLMs larger than memory by streaming bitmap-compressed sparse weights.

Offline:  `convert` (HF folder -> sparseferry checkpoint), `prune`.
Runtime:  `load` (a HF-like causal LM that streams layers under a memory budget).
"""
from .errors import SparseferryError
from .format import BitmapTensor, decode, encode
from .store import open_checkpoint

__version__ = "0.1.0"


def convert(*args, **kwargs):
    """See sparseferry.convert.convert."""
    from .convert import convert as _convert

    return _convert(*args, **kwargs)


def prune(*args, **kwargs):
    """See sparseferry.prune.prune."""
    from .prune import prune as _prune

    return _prune(*args, **kwargs)


def load(*args, **kwargs):
    """See sparseferry.runtime.engine.load."""
    from .runtime import load as _load

    return _load(*args, **kwargs)


def load_tokenizer(*args, **kwargs):
    """See sparseferry.runtime.engine.load_tokenizer."""
    from .runtime import load_tokenizer as _load_tokenizer

    return _load_tokenizer(*args, **kwargs)


def ensure_demo_model(*args, **kwargs):
    """See sparseferry.demo.ensure_demo_model."""
    from .demo import ensure_demo_model as _ensure_demo_model

    return _ensure_demo_model(*args, **kwargs)


__all__ = ["ensure_demo_model", "load", "prune", "load_tokenizer", "BitmapTensor", "SparseferryError", "convert", "decode", "encode", "open_checkpoint", "__version__"]
