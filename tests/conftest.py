"""Shared fixtures: tiny random-weight causal LMs built from transformers configs, saved to tmp folders.

Model hubs are out of reach, so every test that needs a HuggingFace model folder builds one here:

    folder, model = make_tiny_model("llama", tmp_path, sparsity=0.5)

`model` is the in-memory `*ForCausalLM` (eval mode, on CPU) whose `state_dict()` is exactly what
was saved; `folder` holds config.json, generation_config.json, the weights (safetensors, sharded or
not, or a `pytorch_model.bin`) and a small byte-level tokenizer. The linear weights are
magnitude-pruned per matrix to exactly `sparsity` (the smallest |w| are zeroed), so every bitmap
size can be predicted.
"""
from __future__ import annotations

import contextlib
import json
import resource
import signal
import textwrap
import warnings
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from torch import nn

# Tiny configs, one per supported family: 2 layers, hidden 64, 4 heads (2 KV heads where the
# architecture has GQA), vocab 260 = 256 bytes + 4 special tokens of the tokenizer below.
VOCAB = 260
TINY_CONFIGS: dict[str, dict] = {
    "llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128),
    "mistral": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=128, sliding_window=None),
    "qwen2": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128),
    "opt": dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=128, word_embed_proj_dim=64),
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=128),
    "gpt_neox": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=128),
    "phi": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=128),
}
ARCHS = tuple(TINY_CONFIGS)
# Keys naming the width / depth in each family's config (for `hidden=` / `layers=` overrides).
_HIDDEN_KEYS = {"gpt2": ("n_embd",), "opt": ("hidden_size", "word_embed_proj_dim")}
_INNER_KEYS = {"gpt2": ("n_inner",), "opt": ("ffn_dim",)}
_LAYERS_KEY = {"gpt2": "n_layer"}
SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}


class TinyModel(NamedTuple):
    folder: Path  # the HuggingFace model folder
    model: nn.Module  # the same weights, in memory


def tiny_config(arch: str, *, hidden: int | None = None, layers: int | None = None, **overrides):
    """A transformers config for a tiny `arch` model; `hidden` sets the width (and the MLP to 2x it)."""
    from transformers import AutoConfig

    kw = dict(TINY_CONFIGS[arch], vocab_size=VOCAB, bos_token_id=256, eos_token_id=257, pad_token_id=258)
    if hidden is not None:
        for k in _HIDDEN_KEYS.get(arch, ("hidden_size",)):
            kw[k] = hidden
        for k in _INNER_KEYS.get(arch, ("intermediate_size",)):
            kw[k] = 2 * hidden
    if layers is not None:
        kw[_LAYERS_KEY.get(arch, "num_hidden_layers")] = layers
    kw.update(overrides)
    return AutoConfig.for_model(arch, **kw)


def linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """{qualified name: module} of the linear layers (nn.Linear or GPT-2's Conv1D), lm_head excluded."""
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D)) and m is not head}


@torch.no_grad()
def magnitude_prune_(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Zero exactly round(sparsity * numel) entries of `w`, those of smallest magnitude; in place."""
    k = round(sparsity * w.numel())
    if k:
        flat = w.view(-1)
        a = flat.detach().abs().float()
        t = a.kthvalue(k).values  # the k-th smallest magnitude; low-precision weights have many ties at it
        below = a < t
        at_t = (a == t).nonzero().squeeze(1)[: k - int(below.sum())]  # break ties by position
        flat[below] = 0
        flat[at_t] = 0
    return w


def write_tokenizer(folder: Path) -> None:
    """A byte-level BPE tokenizer with no merges (256 byte tokens + the 4 special tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()  # 256 printable stand-ins for the bytes
    vocab = {c: i for i, c in enumerate(sorted(byte_chars))}
    for i, t in enumerate(SPECIAL_TOKENS.values()):
        vocab[t] = 256 + i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS).save_pretrained(folder)


def make_tiny_model(arch: str, tmp_path, *, sparsity: float | None = 0.5, dtype: torch.dtype = torch.bfloat16,
                    seed: int = 0, name: str | None = None, hidden: int | None = None, layers: int | None = None,
                    max_shard_size: str | int | None = None, weights: str = "safetensors", tokenizer: bool = True,
                    **config_overrides) -> TinyModel:
    """Build a tiny random `arch` causal LM, prune its linear weights, save it under `tmp_path`.

    Args:
        arch: one of ARCHS ("llama", "mistral", "qwen2", "opt", "gpt2", "gpt_neox", "phi").
        sparsity: fraction of each linear weight (lm_head excluded) zeroed by magnitude; None = dense.
        dtype: dtype of every parameter (and of the saved weights).
        seed: torch seed for the random initialisation: same seed, same weights.
        name: folder name under tmp_path (default: arch).
        hidden / layers / **config_overrides: change the tiny config (see `tiny_config`).
        max_shard_size: passed to save_pretrained, e.g. "50KB" to get several shards.
        weights: "safetensors" (save_pretrained) or "bin" (torch.save of the state dict, tied copies
            dropped, as `pytorch_model.bin`; transformers 5 no longer writes .bin itself).
        tokenizer: also write a byte-level tokenizer (tokenizer.json and friends).
    Returns:
        TinyModel(folder, model) with `model.state_dict()` equal to the saved weights.
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Writing model shards" bars in the tests' output
    config = tiny_config(arch, hidden=hidden, layers=layers, **config_overrides)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    if sparsity is not None:
        for mod in linear_modules(model).values():
            magnitude_prune_(mod.weight.data, sparsity)
    folder = Path(tmp_path) / (name or arch)
    if weights == "safetensors":
        kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
        model.save_pretrained(folder, **kw)
    elif weights == "bin":
        folder.mkdir(parents=True)
        model.config.save_pretrained(folder)
        model.generation_config.save_pretrained(folder)
        sd = model.state_dict()
        for tgt in tied_weights(model):
            sd.pop(tgt, None)
        torch.save({k: v.contiguous() for k, v in sd.items()}, folder / "pytorch_model.bin")
    else:
        raise ValueError(f"weights={weights!r}: expected 'safetensors' or 'bin'")
    if tokenizer:
        write_tokenizer(folder)
    return TinyModel(folder, model)


def tied_weights(model: nn.Module) -> dict[str, str]:
    """{tied parameter: parameter it shares storage with} among the model's state-dict names."""
    seen: dict[int, str] = {}
    out = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            out[n] = seen[id(p)]
        else:
            seen[id(p)] = n
    return out


def make_checkpoint(arch: str, tmp_path, **kw) -> TinyModel:
    """`make_tiny_model` then `sparseferry.convert` into `tmp_path/<name>-sf`: TinyModel(checkpoint folder, model)."""
    from sparseferry.convert import convert

    src, model = make_tiny_model(arch, tmp_path, **kw)
    dst = src.parent / f"{src.name}-sf"
    convert(src, dst, progress=False)
    return TinyModel(dst, model)


def leftovers(dst) -> list[str]:
    """Temporary siblings a checkpoint writer may leave next to `dst` (.DST.partial-*, .DST.old-*)."""
    dst = Path(dst)
    return sorted(p.name for p in dst.parent.glob(f".{dst.name}.*"))


def assert_nothing_written(dst) -> None:
    """No `dst` folder and no temporary siblings of it."""
    assert not Path(dst).exists(), f"{dst} exists after a failed write"
    assert leftovers(dst) == [], f"leftovers next to {dst}: {leftovers(dst)}"


@contextlib.contextmanager
def file_size_limit(nbytes: int):
    """Within the block, writing a file past `nbytes` fails with EFBIG, as on a full disk.

    Uses RLIMIT_FSIZE with SIGXFSZ ignored (else the process would be killed); both restored after.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)


def read_json(path) -> dict:
    return json.loads(Path(path).read_text())


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor as an integer tensor of the same width (for bit-exact compares)."""
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64, 1: torch.uint8}[t.element_size()])


def assert_bit_equal(actual: torch.Tensor, expected: torch.Tensor, what: str = "tensor") -> None:
    """Same dtype, shape and bits."""
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert tuple(actual.shape) == tuple(expected.shape), f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = bits(actual.contiguous()), bits(expected.contiguous())
    if not torch.equal(a, e):
        n = int((a != e).sum())
        raise AssertionError(f"{what}: {n} of {a.numel()} elements differ in their bits")


@pytest.fixture
def tiny_model(tmp_path):
    """Factory: `tiny_model("llama", sparsity=0.5, ...)` -> TinyModel saved under this test's tmp_path."""

    def make(arch: str, **kw) -> TinyModel:
        return make_tiny_model(arch, tmp_path, **kw)

    return make


# Peak RSS of `sparseferry.load` + generate in a fresh process (argv: checkpoint folder, budget), as JSON.
RSS_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    import sparseferry
    from sparseferry.runtime import parse_budget
    folder, budget = sys.argv[1], sys.argv[2]

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    torch.set_num_threads(1)
    # Warm up torch/transformers code paths (one-time allocations) on a throwaway dense run.
    warm = sparseferry.load(folder, memory_budget=budget)
    with torch.no_grad():
        warm.generate(torch.ones(1, 8, dtype=torch.long), max_new_tokens=4, do_sample=False, pad_token_id=0)
    warm.sparseferry.close(); del warm
    import gc; gc.collect()
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
    before = status("VmRSS:")
    model = sparseferry.load(folder, memory_budget=budget, storage="disk")
    with torch.no_grad():
        model.generate(torch.ones(1, 8, dtype=torch.long), max_new_tokens=8, do_sample=False, pad_token_id=0)
    peak = status("VmHWM:")
    total = model.sparseferry.ckpt.stored_bytes()
    print(json.dumps({"before": before, "peak": peak, "budget": parse_budget(budget, total), "stored": total,
                      "dense": model.sparseferry.ckpt.dense_bytes(), "plan": model.sparseferry.plan.summary()}))
    model.sparseferry.close()
""")
