"""Where pruned weights go: a sparseferry checkpoint, or a HuggingFace folder with the zeros stored densely.

Both write into a temporary sibling folder that is renamed to `dst` only when everything is written;
used as context managers, they remove it when the block raises, so a failed run leaves no `dst`.
Both take one decoder layer at a time, so only one layer's tensors are held for writing.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from ..store import EXTRA_FILE, CheckpointError, CheckpointWriter, layer_file, prepare, prepare_experts


class SparseferrySink:
    """Writes a sparseferry checkpoint (docs/FORMAT.md): linear weights of the decoder layers bitmap-encoded,
    expert parameters one expert at a time (each expert matrix bitmap-encoded)."""

    kind = "sparseferry"

    def __init__(self, dst, source, pruning: dict):
        self.source = source
        info = source.info
        self.writer = CheckpointWriter(dst, config=source.config_dict, architecture=info.architecture,
                                       layers_prefix=info.layers_prefix, num_layers=info.num_layers,
                                       tied=source.tied, extra={"pruning": pruning})
        self.dst = self.writer.dst

    def write(self, layer: int | None, tensors: dict[str, torch.Tensor]) -> None:
        """Store {parameter name: tensor (source dtype and layout)} of decoder layer `layer`, or outside (None)."""
        lin, experts = self.source.info.linear_weights, self.source.info.expert_params
        stored = [prepare_experts(n, t, sparse=True, num_experts=experts[n]) if n in experts else prepare(n, t, sparse=n in lin)
                  for n, t in tensors.items()]
        self.writer.write_file(EXTRA_FILE if layer is None else layer_file(layer), stored, layer)

    def commit(self) -> Path:
        for f in self.source.files_to_copy():
            self.writer.copy_file(f)
        self.writer.write_config("config.json", self.source.config_dict)
        return self.writer.commit()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.writer.__exit__(exc_type, exc, tb)


class DenseSink:
    """Writes a HuggingFace folder loadable by plain transformers: one safetensors shard per decoder
    layer plus one for the rest, an index, config.json and the source's tokenizer files."""

    kind = "hf-dense"

    def __init__(self, dst, source, pruning: dict):
        self.source = source
        from ..guard import prepare_output

        self.dst = prepare_output(dst, force=False)  # also removes temporaries of dead runs
        self.dst.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.dst.parent / f".{self.dst.name}.partial-{os.getpid()}"
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir()
        self.nshards = source.info.num_layers + 1
        self.weight_map: dict[str, str] = {}
        self.total_size = 0
        self.pruning = pruning
        self._committed = False

    def write(self, layer: int | None, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        k = self.nshards if layer is None else layer + 1
        fname = f"model-{k:05d}-of-{self.nshards:05d}.safetensors"
        out = {self.source.output_key(n): t.detach().contiguous() for n, t in tensors.items()}
        save_file(out, str(self.tmp / fname), metadata={"format": "pt"})
        for key, t in out.items():
            self.weight_map[key] = fname
            self.total_size += t.numel() * t.element_size()

    def commit(self) -> Path:
        index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        for f in self.source.files_to_copy():
            shutil.copy2(f, self.tmp / f.name)
        from ..guard import encode_floats

        (self.tmp / "config.json").write_text(json.dumps(encode_floats(self.source.config_dict), indent=2, allow_nan=False))
        (self.tmp / "pruning.json").write_text(json.dumps(self.pruning, indent=2))
        os.rename(self.tmp, self.dst)
        self._committed = True
        return self.dst

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None and not self._committed:
            shutil.rmtree(self.tmp, ignore_errors=True)
