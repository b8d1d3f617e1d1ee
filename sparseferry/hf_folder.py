"""The weights of a HuggingFace model folder, as the model's own parameters, one decoder layer at a time.

The one place that reads HuggingFace source folders, for `convert` and `prune` alike:

- the files: safetensors (sharded or not, by mmap) or `*.bin` (`torch.load(mmap=True, weights_only=True)`);
- compressed-tensors "sparse-bitmask" checkpoints (`P.shape / P.compressed / P.bitmask / P.row_offsets`);
- transformers' own conversion mapping for the model (`transformers.conversion_mapping`): the renames
  and the merges it applies in `from_pretrained`, such as per-expert tensors stacked into one fused
  `[E, ...]` parameter (`MergeModulelist`, `Concatenate`, `Chunk`, ...). Keys are renamed exactly as
  transformers renames them; each conversion runs on its own source tensors only, so a decoder
  layer's parameters are built from that layer's tensors and nothing more is ever held.

`HFWeights.plan` maps every parameter to where it comes from, before any tensor is read, and refuses
what cannot be converted that way (missing tensors or experts, experts of different shapes, a rule
whose outputs span decoder layers) with one line naming the tensor.
"""
from __future__ import annotations

import copy
import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import SparseferryError
from .format import BitmapTensor, FormatError, decode
from .guard import check_source_file
from .hf import ModelInfo, normalize_key
from .sparse24 import SPARSE24_FORMATS, SPARSE24_PARTS, Sparse24Error, is_sparse24, sparse24_to_dense

CT_PARTS = ("shape", "compressed", "bitmask", "row_offsets")
_ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1}


class SourceError(SparseferryError):
    """A HuggingFace folder's weights cannot be read as the model's parameters."""


class SourceWeights:
    """Lazy, by-key access to the tensors of a HuggingFace folder (safetensors or *.bin, sharded or not)."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self.folder = Path(folder)
        self._where: dict[str, Path] = {}
        self._handles: dict[Path, object] = {}
        self._bins: dict[Path, dict] = {}
        st_files = sorted(self.folder.glob("*.safetensors"))
        bin_files = sorted(p for p in self.folder.glob("*.bin") if p.name != "training_args.bin")
        for p in st_files + bin_files:
            check_source_file(self.folder, p)  # a FIFO would block, a link out of the folder read another file
        if not st_files and not bin_files:
            raise SourceError(f"{self.folder}: no weights (*.safetensors or *.bin) found")
        for p in st_files:
            try:
                h = safe_open(p, framework="pt")
            except Exception as e:  # noqa: BLE001 - safetensors raises several error types
                raise SourceError(f"{p}: not a readable safetensors file ({e})") from None
            self._handles[p] = h
            for k in h.keys():
                self._where[k] = p
        if not st_files:
            for p in bin_files:
                try:
                    sd = torch.load(p, map_location="cpu", mmap=True, weights_only=True)
                except Exception as e:  # noqa: BLE001 - pickle / zip errors
                    raise SourceError(f"{p}: cannot be read as a PyTorch state dict ({e})") from None
                if not isinstance(sd, dict):
                    raise SourceError(f"{p}: expected a state dict, found {type(sd).__name__}")
                self._bins[p] = sd
                for k in sd:
                    self._where[k] = p
        self._check_sizes(st_files)

    def _check_sizes(self, files) -> None:
        """Catch truncated shards up front: the header's last offset must match the file size."""
        for p in files:
            with open(p, "rb") as f:
                n = struct.unpack("<Q", f.read(8))[0]
                header = json.loads(f.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            if 8 + n + end != p.stat().st_size:
                raise SourceError(f"{p}: truncated or corrupted ({p.stat().st_size} bytes, header says {8 + n + end})")

    def keys(self):
        return self._where.keys()

    def file_of(self, key: str) -> Path:
        return self._where[key]

    def get(self, key: str) -> torch.Tensor:
        p = self._where[key]
        if p in self._handles:
            try:
                return self._handles[p].get_tensor(key)
            except Exception as e:  # noqa: BLE001
                raise SourceError(f"{p}: cannot read tensor {key} ({e})") from None
        return self._bins[p][key]

    def shape(self, key: str) -> tuple[int, ...]:
        """A tensor's shape without reading it."""
        p = self._where[key]
        if p in self._handles:
            return tuple(self._handles[p].get_slice(key).get_shape())
        return tuple(self._bins[p][key].shape)

    def nbytes(self, key: str) -> int:
        """A tensor's bytes without reading it."""
        p = self._where[key]
        if p in self._handles:
            sl = self._handles[p].get_slice(key)
            n = 1
            for s in sl.get_shape():
                n *= s
            return n * _ST_ITEMSIZE.get(sl.get_dtype(), 2)
        t = self._bins[p][key]
        return t.numel() * t.element_size()


def sparse_bitmask_config(cfg: dict) -> dict | None:
    """The compressed-tensors sparsity config if the source is a sparse-bitmask checkpoint."""
    qc = cfg.get("quantization_config") or cfg.get("compression_config")
    if not isinstance(qc, dict):
        return None
    sc = qc.get("sparsity_config") or {}
    if sc.get("format") not in ("sparse-bitmask", "sparse_bitmask", *SPARSE24_FORMATS):
        return None
    if qc.get("config_groups") and qc.get("format") not in (None, "dense"):
        raise SourceError(f"compressed-tensors checkpoint is quantized (format {qc.get('format')!r}): only dense-valued "
                          "sparse-bitmask is supported")
    return sc


@dataclass
class Conversion:
    """One transformers conversion rule applied to the source tensors of one (group of) parameter(s)."""

    rule: object  # a transformers WeightConverter
    first: str  # the parameter transformers names it by (its first target)
    sources: dict[str, list[str]] = field(default_factory=dict)  # source pattern -> source keys, in load order
    targets: list[str] = field(default_factory=list)  # the parameters it produces


class HFWeights:
    """The parameters of `model` (a transformers causal LM skeleton, meta device) from the folder `folder`.

    `tensor(name)` gives one parameter (dense, source dtype), `stored(name)` the same or the
    `BitmapTensor` of a compressed-tensors source (values bit-exact, not decoded). Parameters built
    by a conversion rule are converted once per rule; the outputs not yet asked for are kept until
    they are (a layer's worth at most).
    """

    def __init__(self, folder, model, info: ModelInfo, config_dict: dict):
        self.folder = Path(folder)
        self.model = model
        self.info = info
        self.weights = SourceWeights(self.folder)
        self.ct = sparse_bitmask_config(config_dict)
        self._shapes = {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
        self._shapes.update((n, tuple(b.shape)) for n, b in model.named_buffers() if n in info.buffer_names)
        self.direct: dict[str, str] = {}  # parameter -> source key (renamed only)
        self.bitmap: dict[str, str] = {}  # parameter -> compressed-tensors prefix (renamed only)
        self.converted: dict[str, Conversion] = {}  # parameter -> the conversion producing it
        self._pending: dict[str, torch.Tensor] = {}
        self._plan()

    # -- planning: where every parameter comes from, before reading anything
    def _plan(self) -> None:
        renamings, converters = _conversion_rules(self.model)
        names = set(self.info.param_names) | set(self.info.buffer_names)  # transformers loads both
        meta = dict.fromkeys(names, True)
        base = self.info.base_prefix

        def rename(key: str) -> tuple[str | None, str | None]:
            if not renamings and not converters:
                return normalize_key(key, names, base), None
            from transformers.core_model_loading import rename_source_key

            renamed, pattern = rename_source_key(key, renamings, converters, base, meta)
            if renamed not in names and normalize_key(key, names, base) is not None:
                return normalize_key(key, names, base), None  # as transformers: a key the model has stays as it is
            if renamed not in names:
                renamed = normalize_key(renamed, names, base)
            return renamed, pattern

        keys = list(self.weights.keys())
        dense_keys, ct_keys = keys, {}
        if self.ct is not None:  # a compressed-tensors matrix P.{shape,compressed,...} stands for the key P.weight
            ct_keys = {k.removesuffix(".compressed") + ".weight": k.removesuffix(".compressed")
                       for k in keys if k.endswith(".compressed")}
            parts = {f"{p}.{part}" for p in ct_keys.values() for part in CT_PARTS}
            dense_keys = [k for k in keys if k not in parts]
        pattern_rule = {p: c for c in converters for p in c.source_patterns}
        from transformers.core_model_loading import dot_natural_key

        for key in sorted([*dense_keys, *ct_keys], key=dot_natural_key):
            name, pattern = rename(key)
            if name is None:
                continue  # not a parameter of this model (e.g. rotary buffers, unused heads): ignored, as transformers does
            if pattern is None:
                if name in self.converted or name in self.direct or name in self.bitmap:
                    continue  # two source keys for one parameter: the first one, as before
                if key in ct_keys:
                    self.bitmap[name] = ct_keys[key]
                else:
                    self.direct[name] = key
                continue
            conv = self.converted.get(name)
            if conv is None:
                rule = copy.deepcopy(pattern_rule[pattern])
                conv = Conversion(rule, name)
                first_pattern = rule.target_patterns[0]
                conv.targets = [name.replace(first_pattern, t) for t in rule.target_patterns] \
                    if len(rule.target_patterns) > 1 else [name]
                for t in conv.targets:
                    self.converted[t] = conv
            conv.sources.setdefault(pattern, []).append(key)
        for conv in {id(c): c for c in self.converted.values()}.values():
            self._check_conversion(conv)

    def _check_conversion(self, conv: Conversion) -> None:
        """Refuse, before reading, a conversion that is wrong or cannot be applied one layer at a time."""
        names = set(self.info.param_names) | set(self.info.buffer_names)
        unknown = [t for t in conv.targets if t not in names]
        if unknown:
            raise SourceError(f"{self.folder}: conversion rule {_rule_name(conv.rule)} builds {unknown[0]} from "
                              f"{_first_key(conv)}, which is not a parameter of {self.info.architecture}")
        layers = {self.info.layer_of(t) for t in conv.targets}
        if len(layers) > 1:
            raise SourceError(f"{self.folder}: conversion rule {_rule_name(conv.rule)} cannot be applied one decoder layer "
                              f"at a time: from {_first_key(conv)} it builds {', '.join(conv.targets)} in different layers")
        ops = getattr(conv.rule, "operations", [])
        merge = ops and type(ops[0]).__name__ == "MergeModulelist" and getattr(ops[0], "dim", 0) == 0
        experts = self._shapes[conv.first][0] if merge and self._shapes[conv.first] else None
        for pattern, keys in conv.sources.items():
            shapes = [self._source_shape(k) for k in keys]
            for k, s in zip(keys, shapes):
                if s != shapes[0]:
                    raise SourceError(f"{self.folder}: tensor {k} has shape {list(s)}, expected {list(shapes[0])} like "
                                      f"{keys[0]} (experts of one parameter must have one shape; building {conv.first})")
            if experts is not None:
                idx = _star_indices(pattern, keys)
                want = list(range(experts))
                if idx is not None and idx != want:
                    gone = [i for i in want if i not in idx]
                    example = _with_index(pattern, keys[0], gone[0]) if gone else None
                    what = (f"missing {example}" + (f" and {len(gone) - 1} more" if len(gone) > 1 else "")) if gone \
                        else f"found experts {idx[experts:][:3]} beyond the {experts} of the model"
                    raise SourceError(f"{self.folder}: {what} (building {conv.first} of {experts} experts "
                                      f"from {pattern})")
                if idx is None and len(keys) != experts:
                    raise SourceError(f"{self.folder}: {len(keys)} tensors match {pattern} for {conv.first}, "
                                      f"expected one per expert ({experts})")

    def _source_shape(self, key: str) -> tuple[int, ...]:
        if self.ct is not None and key.endswith(".weight") and f"{key.removesuffix('.weight')}.shape" in self.weights.keys() \
                and f"{key.removesuffix('.weight')}.compressed" in self.weights.keys():
            return tuple(int(x) for x in self.weights.get(f"{key.removesuffix('.weight')}.shape").tolist())
        return self.weights.shape(key)

    # -- what the plan covers
    def has(self, name: str) -> bool:
        return name in self.direct or name in self.bitmap or name in self.converted

    def missing(self, tied: dict[str, str]) -> list[str]:
        """Parameters without a source (buffers may be absent: the model computes them)."""
        return [n for n in self.info.param_names if not self.has(n) and n not in tied]

    def buffers(self) -> list[str]:
        """The persistent buffers the folder holds (stored like parameters)."""
        return [n for n in self.info.buffer_names if self.has(n)]

    def check_complete(self, tied: dict[str, str]) -> None:
        missing = self.missing(tied)
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise SourceError(f"{self.folder}: weights missing for {', '.join(missing[:5])}{more}")

    def source_key(self, name: str) -> str:
        """The key a HuggingFace checkpoint would store `name` under: the source's own for a renamed
        tensor, the parameter's name for one built by a conversion (transformers loads it as it is)."""
        if name in self.direct:
            return self.direct[name]
        if name in self.bitmap:
            return self.bitmap[name] + ".weight"
        return name

    def source_file(self, name: str) -> Path | None:
        key = self.direct.get(name) or (f"{self.bitmap[name]}.compressed" if name in self.bitmap else None)
        return self.weights.file_of(key) if key else None

    def nbytes(self, name: str) -> int:
        """Dense bytes of a parameter's source, without reading it (for progress bars)."""
        try:
            if name in self.direct:
                return self.weights.nbytes(self.direct[name])
            if name in self.bitmap:
                p = self.bitmap[name]
                n = 1
                for s in self.weights.get(f"{p}.shape").tolist():
                    n *= int(s)
                return n * self.weights.get(f"{p}.compressed").element_size()
            conv = self.converted[name]
            return sum(self._key_nbytes(k) for ks in conv.sources.values() for k in ks) // len(conv.targets)
        except Exception:  # noqa: BLE001 - only for progress
            return 0

    def _key_nbytes(self, key: str) -> int:
        if key in self.weights.keys():
            return self.weights.nbytes(key)
        p = key.removesuffix(".weight")
        n = 1
        for s in self.weights.get(f"{p}.shape").tolist():
            n *= int(s)
        return n * self.weights.get(f"{p}.compressed").element_size()

    # -- reading
    def stored(self, name: str):
        """A parameter as the source stores it: a dense tensor, or a BitmapTensor (compressed-tensors)."""
        if name in self.bitmap:
            return self._bitmap(self.bitmap[name])
        if name in self.direct:
            return self.weights.get(self.direct[name])
        if name in self._pending:
            return self._pending.pop(name)
        conv = self.converted.get(name)
        if conv is None:
            raise SourceError(f"{self.folder}: no source for parameter {name}")
        out = self._convert(conv)
        for t, v in out.items():
            if t != name:
                self._pending[t] = v
        return out[name]

    def tensor(self, name: str) -> torch.Tensor:
        """A parameter as a dense tensor in its source dtype and the model's layout."""
        s = self.stored(name)
        return decode(s) if isinstance(s, BitmapTensor) else s

    def _bitmap(self, prefix: str) -> BitmapTensor | torch.Tensor:
        """A compressed-tensors matrix: its BitmapTensor (sparse-bitmask, values as they are), or the
        dense weight of a sparse-24-bitmask one (scattered back; stored in our own bitmap later)."""
        if is_sparse24(self.ct):
            parts = {part: self.weights.get(f"{prefix}.{part}") for part in SPARSE24_PARTS
                     if f"{prefix}.{part}" in self.weights.keys()}
            try:
                return sparse24_to_dense(parts, prefix)
            except Sparse24Error as e:
                raise SourceError(f"{self.folder}: {e}") from None
        try:
            parts = {part: self.weights.get(f"{prefix}.{part}") for part in CT_PARTS}
            return BitmapTensor.from_parts(parts, prefix)
        except KeyError as e:
            raise SourceError(f"{self.folder}: compressed tensor {prefix} lacks part {e}") from None
        except FormatError as e:
            raise SourceError(f"{self.folder}: {e}") from None

    def _load_key(self, key: str) -> torch.Tensor:
        if key in self.weights.keys():
            return self.weights.get(key)
        m = self._bitmap(key.removesuffix(".weight"))  # a compressed-tensors matrix feeding a conversion
        return decode(m) if isinstance(m, BitmapTensor) else m

    def _convert(self, conv: Conversion) -> dict[str, torch.Tensor]:
        rule = copy.deepcopy(conv.rule)
        for pattern, keys in conv.sources.items():
            for k in keys:
                rule.add_tensor(conv.first, k, pattern, lambda k=k: self._load_key(k))
        try:
            out = rule.convert(conv.first, model=self.model, config=self.model.config)
        except Exception as e:  # noqa: BLE001 - any failure of the rule on these tensors
            raise SourceError(f"{self.folder}: conversion rule {_rule_name(conv.rule)} failed on {_first_key(conv)} "
                              f"building {conv.first} ({type(e).__name__}: {e})") from None
        result = {}
        for t, v in out.items():
            v = v[0] if isinstance(v, list) else v
            if t not in conv.targets:
                raise SourceError(f"{self.folder}: conversion rule {_rule_name(conv.rule)} built {t} from {_first_key(conv)}, "
                                  f"expected {', '.join(conv.targets)}")
            if tuple(v.shape) != self._shapes[t]:
                raise SourceError(f"{self.folder}: {t} built from {_first_key(conv)} has shape {list(v.shape)}, "
                                  f"expected {list(self._shapes[t])}")
            result[t] = v.contiguous()
        if set(result) != set(conv.targets):
            raise SourceError(f"{self.folder}: conversion rule {_rule_name(conv.rule)} did not build "
                              f"{', '.join(sorted(set(conv.targets) - set(result)))} from {_first_key(conv)}")
        return result

    def check_shape(self, name: str, t) -> None:
        """A renamed source tensor must have the parameter's shape."""
        shape = tuple(t.shape)
        if shape != self._shapes[name]:
            raise SourceError(f"{self.folder}: tensor {self.source_key(name)} has shape {list(shape)}, "
                              f"expected {list(self._shapes[name])} for {name}")


def _conversion_rules(model):
    """transformers' (renamings, converters) for `model`, as `from_pretrained` gets them; none on old versions."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming
    except ImportError:  # pragma: no cover - transformers 4: no mapping
        return [], []
    rules = get_model_conversion_mapping(model)
    return ([r for r in rules if isinstance(r, WeightRenaming)], [r for r in rules if isinstance(r, WeightConverter)])


def _rule_name(rule) -> str:
    ops = ", ".join(type(o).__name__ for o in getattr(rule, "operations", []))
    return f"{list(rule.source_patterns)} -> {list(rule.target_patterns)} ({ops})"


def _first_key(conv: Conversion) -> str:
    keys = [k for ks in conv.sources.values() for k in ks]
    return keys[0] + (f" and {len(keys) - 1} more tensors" if len(keys) > 1 else "")


def _star_regex(pattern: str) -> re.Pattern | None:
    if "*" not in pattern:
        return None
    return re.compile(re.escape(pattern).replace(r"\*", r"(\d+)"))


def _star_indices(pattern: str, keys: list[str]) -> list[int] | None:
    """The expert indices (the `*` of the pattern) of the keys, sorted; None when the pattern has no `*`."""
    rx = _star_regex(pattern)
    if rx is None:
        return None
    idx = []
    for k in keys:
        m = rx.search(k)
        if m is None:
            return None
        idx.append(int(m.group(1)))
    return sorted(idx)


def _with_index(pattern: str, key: str, i: int) -> str:
    """`key` with its expert index replaced by i (to name a missing tensor)."""
    m = _star_regex(pattern).search(key)
    return key[: m.start(1)] + str(i) + key[m.end(1) :]
