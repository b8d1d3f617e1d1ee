"""Where the weights to prune come from: a HuggingFace folder (read tensor by tensor, never whole) or
a transformers model already in memory. Both give the pruning loop the same things: a model whose
non-layer modules hold real weights, one decoder layer at a time with real weights, and every
stored tensor in its source dtype for writing.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import nn

from ..hf import (
    ModelError,
    config_from_dict,
    find_decoder_layers,
    model_info,
    read_config_dict,
)

_SKIP_FILES = {"config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json"}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")


def _set_param(root: nn.Module, name: str, value: torch.Tensor) -> None:
    modname, _, pname = name.rpartition(".")
    mod = root.get_submodule(modname) if modname else root
    mod._parameters[pname] = nn.Parameter(value, requires_grad=False)


def _set_buffer(root: nn.Module, name: str, value: torch.Tensor) -> None:
    modname, _, bname = name.rpartition(".")
    mod = root.get_submodule(modname) if modname else root
    mod._buffers[bname] = value


def _load(root: nn.Module, name: str, value: torch.Tensor, buffers, dtype: torch.dtype) -> None:
    """Put `value` in parameter or persistent buffer `name` of `root`, floats in `dtype`."""
    if name in buffers:
        _set_buffer(root, name, value.to(dtype) if value.is_floating_point() else value)
    else:
        _set_param(root, name, value.to(dtype))


def folder_tokenizer(folder: Path):
    """AutoTokenizer of a folder, or None when it has no usable tokenizer files."""
    from transformers import AutoTokenizer

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError, KeyError):
        return None


def small_files(folder: Path) -> list[Path]:
    """Tokenizer, generation config and other non-weight files of a model folder (config.json excluded)."""
    from ..guard import check_source_file

    return [check_source_file(folder, f) for f in sorted(Path(folder).iterdir())
            if f.is_file() and f.name not in _SKIP_FILES and not f.name.endswith(_WEIGHT_SUFFIXES)]


def build_skeleton(config) -> nn.Module:
    """The causal LM for `config` with every parameter on the meta device but real buffers (rotary
    frequencies, position ids): they are computed at construction and rarely stored in checkpoints."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with init_empty_weights(include_buffers=False):
                model = AutoModelForCausalLM.from_config(config)
        except ValueError as e:
            raise ModelError(f"transformers cannot build a causal LM for model_type {config.model_type!r}: {e}") from None
    return model.eval()


class FolderSource:
    """A HuggingFace model folder: config.json, weights (*.safetensors or *.bin), tokenizer files."""

    def __init__(self, folder):
        from ..hf_folder import HFWeights

        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ModelError(f"{self.folder}: no such folder")
        self.config_dict = read_config_dict(self.folder)
        self.config = config_from_dict(self.config_dict)
        self.model = build_skeleton(self.config)
        self.layers_prefix, self.layers = find_decoder_layers(self.model)
        self.info = model_info(self.model)
        # the shared reader of HuggingFace folders: files, compressed-tensors, transformers' conversion mapping
        self.weights = HFWeights(self.folder, self.model, self.info, self.config_dict)
        self.tied = {t: s for t, s in self.info.tied.items() if not self.weights.has(t)}
        self.weights.check_complete(self.tied)
        self.buffers = self.weights.buffers()  # persistent buffers the folder holds (e.g. router score corrections)
        self.name = self.folder.name
        dt = self.config_dict.get("torch_dtype") or self.config_dict.get("dtype")
        # bytes per element of the stored weights (for the memory estimate; fp32 when unknown)
        self.itemsize = {"bfloat16": 2, "float16": 2, "float32": 4}.get(dt, 4) if isinstance(dt, str) else 4

    @property
    def stored_names(self) -> list[str]:
        """Parameters and persistent buffers stored in the output (tied copies are stored once)."""
        return [n for n in self.info.param_names if n not in self.tied] + self.buffers

    def tensor(self, name: str) -> torch.Tensor:
        """A parameter in its source dtype, in the model's layout (conversions applied, bitmaps decoded)."""
        return self.weights.tensor(name)

    def output_key(self, name: str) -> str:
        """The key under which a HuggingFace checkpoint stores this parameter: the source's own for a
        renamed tensor, the model's name for one that transformers' conversion mapping built."""
        return self.weights.source_key(name)

    def materialize_non_layer(self, dtype: torch.dtype) -> None:
        """Load the parameters outside the decoder layers that run before layer 0, in `dtype`.

        The output head (lm_head) is left on the meta device: calibration never reaches it.
        """
        for n in self.info.param_names + self.buffers:
            if self.info.layer_of(n) is None and n not in self.info.top_linear_weights and n not in self.tied:
                _load(self.model, n, self.tensor(n), self.buffers, dtype)
        for t, s in self.tied.items():
            if t not in self.info.top_linear_weights:
                _set_param(self.model, t, self.model.get_parameter(s))

    def load_layer(self, i: int, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> nn.Module:
        """Decoder layer i holding `tensors` ({parameter or buffer name: source tensor}, read by `tensor`) in `dtype`."""
        prefix = f"{self.layers_prefix}.{i}."
        layer = self.layers[i]
        buffers = {n[len(prefix) :] for n in self.buffers if n.startswith(prefix)}
        for n in self.info.layer_params(i) + [b for b in self.buffers if b.startswith(prefix)]:
            _load(layer, n[len(prefix) :], tensors[n] if n in tensors else self.tensor(n), buffers, dtype)
        return layer

    def release_layer(self, i: int) -> None:
        """Free layer i's weights (back to the meta device)."""
        self.layers[i].to("meta")

    def tokenizer(self):
        """The folder's tokenizer, or None when the folder has no tokenizer files."""
        return folder_tokenizer(self.folder)

    def files_to_copy(self) -> list[Path]:
        """Tokenizer, generation config and other small files to copy next to the pruned weights."""
        return small_files(self.folder)


class ModuleSource:
    """A transformers causal LM in memory, with real weights. Its decoder layers are pruned in place."""

    def __init__(self, model: nn.Module):
        if any(p.device.type == "meta" for p in model.parameters()):
            raise ModelError(f"{type(model).__name__}: some parameters are on the meta device (load real weights first)")
        self.model = model.eval()
        self.layers_prefix, self.layers = find_decoder_layers(model)
        self.info = model_info(model)
        self.tied = dict(self.info.tied)
        cfg = getattr(model, "config", None)
        if cfg is None or not hasattr(cfg, "to_json_string"):
            raise ModelError(f"{type(model).__name__}: not a transformers model (no config); save it with save_pretrained "
                             "and pass the folder")
        self.config = cfg
        self.config_dict = json.loads(cfg.to_json_string(use_diff=False))
        self.config_dict["architectures"] = [type(model).__name__]
        self._params = dict(model.named_parameters(remove_duplicate=False))
        self.buffers = list(self.info.buffer_names)  # persistent buffers (in the state dict)
        self._params.update({n: b for n, b in model.named_buffers(remove_duplicate=False) if n in set(self.buffers)})
        self._dtypes: dict[int, torch.dtype] = {}
        self.name = type(model).__name__
        self.itemsize = max((p.element_size() for p in model.parameters()), default=4)

    @property
    def stored_names(self) -> list[str]:
        return [n for n in self.info.param_names if n not in self.tied] + self.buffers

    def tensor(self, name: str) -> torch.Tensor:
        return self._params[name].detach()

    def output_key(self, name: str) -> str:
        return name

    def materialize_non_layer(self, dtype: torch.dtype) -> None:
        """Nothing to load: the model's own modules run (in their own dtype; their outputs are cast)."""

    def load_layer(self, i: int, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> nn.Module:
        """The model's own layer i, cast to `dtype` in place (`tensors` are its parameters already)."""
        layer = self.layers[i]
        self._dtypes[i] = next(layer.parameters()).dtype
        return layer.to(dtype)

    def release_layer(self, i: int) -> None:
        self.layers[i].to(self._dtypes.pop(i))

    def _origin(self) -> Path | None:
        """The folder the model was loaded from, if it is one here (for its tokenizer files)."""
        path = getattr(self.config, "_name_or_path", "") or ""
        return Path(path) if path and Path(path).is_dir() else None

    def tokenizer(self):
        return folder_tokenizer(self._origin()) if self._origin() else None

    def files_to_copy(self) -> list[Path]:
        return small_files(self._origin()) if self._origin() else []


def open_source(model_or_dir):
    """A FolderSource for a path, a ModuleSource for an nn.Module."""
    if isinstance(model_or_dir, nn.Module):
        return ModuleSource(model_or_dir)
    return FolderSource(model_or_dir)
