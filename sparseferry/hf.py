"""What we need to know about a HuggingFace causal LM, without per-model code.

The skeleton is built from config.json on the `meta` device (no memory, no weights); from it we
learn the decoder layers (the largest ModuleList of identical blocks), which parameters are the
weights of linear layers inside them (nn.Linear, or GPT-2's transposed Conv1D), and which
parameters are tied.
"""
from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import SparseferryError


class ModelError(SparseferryError):
    """The model folder or architecture cannot be used."""


def read_config_dict(folder: Path) -> dict:
    """config.json of a model folder (a regular file inside it), with non-finite floats decoded."""
    from .guard import check_source_file, decode_floats

    path = Path(folder) / "config.json"
    if not path.exists() and not path.is_symlink():
        raise ModelError(f"{folder}: no config.json (expected a HuggingFace model folder)")
    check_source_file(folder, path)
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ModelError(f"{path}: not a JSON object")
    return decode_floats(cfg)


def config_from_dict(cfg: dict):
    """A transformers config object from a config.json dict; a clear error for unknown model types."""
    from transformers import AutoConfig

    from .guard import check_config_limits, decode_floats

    cfg = decode_floats(cfg)
    check_config_limits(cfg)
    model_type = cfg.get("model_type")
    if not model_type or not isinstance(model_type, str):
        raise ModelError("config.json has no 'model_type'")
    try:
        config = AutoConfig.for_model(**cfg)
    except (ValueError, KeyError) as e:
        raise ModelError(f"model_type {model_type!r} is not known to transformers ({e})") from None
    except Exception as e:  # noqa: BLE001 - a config transformers' own validation rejects
        raise ModelError(f"config.json: transformers rejects this {model_type!r} config ({type(e).__name__}: {e})") from None
    check_config_limits(config)
    return config


def build_meta_model(config) -> nn.Module:
    """The causal LM skeleton for `config`, on the meta device."""
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config)
        except ValueError as e:
            raise ModelError(f"transformers cannot build a causal LM for model_type {config.model_type!r}: {e}") from None
    return model


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(qualified name, module) of the ModuleList holding the decoder layers.

    The list whose length is the config's `num_hidden_layers` (the largest, if several), else the
    largest ModuleList of identical blocks. Layers of several classes (hybrid models such as
    Jamba: Mamba and attention layers) are fine as long as each holds its own parameters; layers
    sharing parameters with each other (Zamba, Zamba2: one transformer block reused at several
    depths) cannot be streamed one layer at a time and are refused.
    """
    lists = [(name, mod, sum(p.numel() for p in mod.parameters()))
             for name, mod in model.named_modules() if isinstance(mod, nn.ModuleList) and len(mod) > 0]
    depth = _num_hidden_layers(getattr(model, "config", None))
    by_depth = [c for c in lists if depth is not None and len(c[1]) == depth]
    same = [c for c in lists if len({type(m) for m in c[1]}) == 1]
    pool = by_depth or same
    if not pool:
        raise ModelError(f"{type(model).__name__}: no decoder layers found (expected a ModuleList of identical blocks)")
    name, layers, _ = max(pool, key=lambda c: c[2])
    owner: dict[int, str] = {}
    for i, layer in enumerate(layers):
        for pname, p in layer.named_parameters(remove_duplicate=False):
            j = owner.setdefault(id(p), f"{name}.{i}.{pname}")
            if not j.startswith(f"{name}.{i}."):
                raise ModelError(f"{type(model).__name__}: its decoder layers share parameters ({j} is also "
                                 f"{name}.{i}.{pname}); streaming them one layer at a time is not supported")
    return name, layers


def _num_hidden_layers(config) -> int | None:
    if config is None:
        return None
    get_text = getattr(config, "get_text_config", None)
    text = get_text() if get_text is not None else config
    for k in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
        v = getattr(text, k, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def expert_parameters(layers: nn.Module, prefix: str) -> dict[str, int]:
    """{parameter name: E} of the expert parameters inside the decoder layers (docs/FORMAT.md, 2b).

    A fused-experts module is one with an integer `num_experts` (transformers' experts classes,
    JetMoE's parallel experts) or `moe_num_experts` (DBRX). Its expert parameters are those of 2 or
    more dims whose leading dim is E (`[E, R, C]` matrices, `[E, R]` biases) when it holds such a
    matrix; otherwise (DBRX: `[E * F, H]`) its 2-D parameters whose rows split into E equal blocks.
    Either way expert e's slice is the e-th of E equal contiguous pieces of the parameter.
    """
    out = {}
    for mname, mod in layers.named_modules():
        e = getattr(mod, "num_experts", None)
        if e is None:
            e = getattr(mod, "moe_num_experts", None)
        if not isinstance(e, int) or isinstance(e, bool) or e < 1 or isinstance(mod, nn.modules.conv._ConvNd):
            continue
        direct = list(mod.named_parameters(recurse=False))
        if any(p.dim() >= 3 and p.shape[0] == e for _, p in direct):
            picked = [n for n, p in direct if p.dim() >= 2 and p.shape[0] == e]
        else:
            picked = [n for n, p in direct if p.dim() == 2 and p.shape[0] > e and p.shape[0] % e == 0]
        for pname in picked:
            out[f"{prefix}.{mname}.{pname}" if mname else f"{prefix}.{pname}"] = e
    return out


def is_linear(mod: nn.Module) -> bool:
    if isinstance(mod, nn.Linear):
        return True
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        return False
    return isinstance(mod, Conv1D)


@dataclass
class ModelInfo:
    """The facts about an architecture the converter, pruner and runtime share."""

    architecture: str
    layers_prefix: str  # e.g. "model.layers"
    num_layers: int
    param_names: list[str]  # every parameter, state-dict names, in module order
    linear_weights: set[str]  # 2-D weights of linear layers inside decoder layers
    tied: dict[str, str] = field(default_factory=dict)  # target -> source, stored once
    base_prefix: str = ""  # e.g. "model" (GPT-2 checkpoints may omit "transformer.")
    top_linear_weights: set[str] = field(default_factory=set)  # linear weights outside layers (lm_head)
    embedding_weights: set[str] = field(default_factory=set)
    expert_params: dict[str, int] = field(default_factory=dict)  # fused expert parameters -> number of experts
    # persistent buffers (in the state dict, not parameters: e.g. DeepSeek-V3's router score correction);
    # stored when the checkpoint has them, else they keep the values the model computes at construction
    buffer_names: list[str] = field(default_factory=list)

    def layer_of(self, name: str) -> int | None:
        """Decoder layer index of a parameter name, or None outside the layers."""
        p = self.layers_prefix + "."
        if not name.startswith(p):
            return None
        return int(name[len(p) :].split(".", 1)[0])

    def layer_params(self, i: int) -> list[str]:
        p = f"{self.layers_prefix}.{i}."
        return [n for n in self.param_names if n.startswith(p)]


def model_info(model: nn.Module) -> ModelInfo:
    prefix, layers = find_decoder_layers(model)
    linear, top_linear, emb = set(), set(), set()
    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if not isinstance(w, torch.Tensor) or w.dim() != 2:
            continue
        if is_linear(mod):
            (linear if name.startswith(prefix + ".") else top_linear).add(f"{name}.weight")
        elif isinstance(mod, nn.Embedding):
            emb.add(f"{name}.weight")
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    tied = {}
    tie = getattr(model.config, "tie_word_embeddings", False)
    get_text = getattr(model.config, "get_text_config", None)
    if get_text is not None:
        tie = getattr(get_text(), "tie_word_embeddings", tie)
    tk = getattr(model, "_tied_weights_keys", None)
    if tie and isinstance(tk, dict):
        tied = {t: s for t, s in tk.items() if t in names and s in names}
    elif tie:
        out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
        if out_emb is not None and in_emb is not None:
            src = next((n for n, m in model.named_modules() if m is in_emb), None)
            dst = next((n for n, m in model.named_modules() if m is out_emb), None)
            if src is not None and dst is not None:
                tied = {f"{dst}.weight": f"{src}.weight"}
    # deduplicate names that share one parameter object (already tied at construction)
    seen, unique = set(), []
    for n in names:
        if n not in seen:
            seen.add(n)
            unique.append(n)
    return ModelInfo(
        architecture=type(model).__name__,
        layers_prefix=prefix,
        num_layers=len(layers),
        param_names=unique,
        linear_weights=linear,
        tied=tied,
        base_prefix=getattr(model, "base_model_prefix", "") or "",
        top_linear_weights=top_linear,
        embedding_weights=emb,
        expert_params=expert_parameters(layers, prefix),
        buffer_names=[n for n in model.state_dict() if n not in seen],
    )


def info_from_config_dict(cfg: dict) -> tuple[object, nn.Module, ModelInfo]:
    config = config_from_dict(cfg)
    model = build_meta_model(config)
    return config, model, model_info(model)


_LAYER_RE = re.compile(r"\.(\d+)\.")


def normalize_key(key: str, names: set[str], base_prefix: str) -> str | None:
    """Map a checkpoint key to the model's state-dict name (adds/removes the base prefix), or None."""
    if key in names:
        return key
    if base_prefix:
        k = f"{base_prefix}.{key}"
        if k in names:
            return k
        if key.startswith(base_prefix + "."):
            k = key[len(base_prefix) + 1 :]
            if k in names:
                return k
    return None
