"""llama.cpp side by side: GGUF files from the same weights, and decode speed from `llama-bench`.

Given a llama.cpp build (benchmarks/build_llama_cpp.sh prints its folder; `--llama-cpp DIR` is that
build folder or its bin/) and its source tree (`--llama-cpp-src`, else found next to DIR):

How the GGUF files are made (`gguf_files`, once per model, into the bench's work folder):
  1. a conversion folder: symbolic links to the model's weight files (the SAME pruned weights the
     other systems run, zeros stored densely: llama.cpp has no sparse format), its config.json with
     `architectures` filled in where missing, and its tokenizer. A synthetic model's byte-level
     tokenizer is not one llama.cpp's converter recognizes (it hashes the pre-tokenizer's output
     against known models), so synthetic models get a stand-in Llama-style tokenizer of the same
     vocabulary size (byte fallback, no merges). llama-bench decodes token ids, never text, so the
     tokenizer cannot change a timing; it is never used by the other systems;
  2. bf16 by llama.cpp's own `convert_hf_to_gguf.py --outtype bf16` (run with this interpreter,
     PYTHONPATH=<source>/gguf-py; it needs `sentencepiece`, which the build script installs);
  3. Q8_0 and Q4_0 from the bf16 file by `llama-quantize` (its default mix: a Q4_0 file keeps a few
     tensors, e.g. the output head, at higher precision).
  Every file is written under a temporary name and renamed when complete.

How llama-bench is run (`bench_runs`): `llama-bench -m FILE -t THREADS -n NEW -p PROMPT -d PROMPT -o json`
(-d: decode NEW tokens after a context of PROMPT tokens, as the other systems decode after their
prompt; omitted on builds without it), its decode ms/token from the token-generation record. Two modes:
  - resident (in-RAM scenario): one process, `-r REPS`, llama.cpp's own warm-up, its defaults
    (mmap, CPU repacking of quantized weights): the whole file sits in the page cache;
  - streamed (cgroup scenario): one process per repetition (`-r 1`), the page cache of the GGUF
    emptied before each, inside a memory cgroup; `--repack 0` and `-lm mmap` (where the build has
    them) so the weights are read through the memory map and never copied into anonymous memory.
    Bytes read per token: the kernel's count of bytes the process fetched from storage (its
    read_bytes, from getrusage of the reaped child), of an N-token run minus a 1-token run with the
    same load, warm-up and context, divided by N - 1.
Nothing here runs in the tests or CI against a real build: it needs a compiled llama.cpp.

    python -m sparseferry.bench.llama_cpp --llama-cpp DIR --model MODEL_DIR --workdir W [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from ..errors import SparseferryError

KINDS = ("bf16", "q8_0", "q4_0")  # GGUF encodings compared: llama.cpp's bf16 and its two block quantizations
WEIGHT_SUFFIXES = (".safetensors", ".bin")


class LlamaCppError(SparseferryError):
    """The llama.cpp build is missing a tool, or a tool failed."""


def find_tool(root: Path, name: str) -> Path:
    """`name` (e.g. llama-bench) in root, root/bin or root/build/bin."""
    root = Path(root)
    for d in (root, root / "bin", root / "build" / "bin"):
        if (d / name).is_file() and os.access(d / name, os.X_OK):
            return d / name
    raise LlamaCppError(f"{root}: no executable {name} in it, bin/ or build/bin/ (build it with benchmarks/build_llama_cpp.sh)")


def find_converter(root: Path) -> Path:
    """llama.cpp's convert_hf_to_gguf.py in the source tree at or under root (as the build script unpacks it)."""
    root = Path(root)
    hits = sorted(root.glob("convert_hf_to_gguf.py")) + sorted(root.glob("*/llama.cpp/convert_hf_to_gguf.py"))
    hits += sorted(root.glob("*/convert_hf_to_gguf.py"))
    if not hits:
        raise LlamaCppError(f"{root}: no llama.cpp source tree with convert_hf_to_gguf.py under it")
    return hits[0]


def find_converter_near(build: Path, src: Path | None = None) -> Path:
    """The converter in `src` if given, else in the build folder or up to two folders above it
    (benchmarks/build_llama_cpp.sh puts build/ next to the unpacked source)."""
    if src is not None:
        return find_converter(src)
    build = Path(build).resolve()
    for d in (build, build.parent, build.parent.parent):
        try:
            return find_converter(d)
        except LlamaCppError:
            continue
    raise LlamaCppError(f"no llama.cpp source tree (convert_hf_to_gguf.py) in or near {build}: pass --llama-cpp-src")


class LlamaCpp:
    """A llama.cpp build: its tools (llama-bench, llama-quantize) and its converter, checked up front."""

    def __init__(self, build, src=None):
        self.build = Path(build)
        self.bench = find_tool(self.build, "llama-bench")
        self.quantize = find_tool(self.build, "llama-quantize")
        self.converter = find_converter_near(self.build, Path(src) if src else None)
        self._help = None

    def supports(self, flag: str) -> bool:
        """Whether this llama-bench lists `flag` in its --help (options differ between versions)."""
        if self._help is None:
            p = subprocess.run([str(self.bench), "--help"], capture_output=True, text=True)
            self._help = p.stdout + p.stderr
        return f" {flag} " in self._help or f" {flag}," in self._help or f"{flag} <" in self._help


def _run(cmd: list[str], what: str, env=None) -> str:
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode:
        tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise LlamaCppError(f"{what} failed (exit {p.returncode}): {tail[0]}")
    return p.stdout


def write_standin_tokenizer(folder: Path, vocab_size: int) -> None:
    """A Llama-style tokenizer (BPE with byte fallback, no merges) of exactly `vocab_size` tokens:
    <unk> <s> </s>, the 256 byte tokens <0x00>..<0xFF>, then filler pieces."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 3 + 256:
        raise LlamaCppError(f"vocabulary of {vocab_size} tokens: a stand-in tokenizer needs at least 259")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    vocab.update({f"\u2581t{i}": len(vocab) + i for i in range(vocab_size - len(vocab))})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(folder)


def conversion_folder(model_dir: Path, dst: Path) -> Path:
    """The folder convert_hf_to_gguf.py reads (see the module docstring, step 1), made once."""
    model_dir = Path(model_dir).resolve()
    if dst.exists():
        return dst
    tmp = dst.with_name(dst.name + ".part")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    config = json.loads((model_dir / "config.json").read_text())
    if not config.get("architectures"):
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        arch = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.get("model_type"))
        if arch is None:
            raise LlamaCppError(f"{model_dir}/config.json: no `architectures` and model_type {config.get('model_type')!r} "
                                "is not a causal LM transformers knows")
        config["architectures"] = [arch]
    (tmp / "config.json").write_text(json.dumps(config, indent=1))
    synthetic = (model_dir / "synth.json").exists()
    for f in sorted(model_dir.iterdir()):
        if f.name == "config.json" or (synthetic and f.name.startswith(("tokenizer", "special_tokens"))):
            continue
        if f.is_file() and (f.suffix in WEIGHT_SUFFIXES or f.name.endswith(".index.json") or not synthetic):
            (tmp / f.name).symlink_to(f)
    if synthetic:
        write_standin_tokenizer(tmp, int(config["vocab_size"]))
    tmp.rename(dst)
    return dst


def gguf_files(tools: LlamaCpp, model_dir: Path, workdir: Path, kinds=KINDS, python: str = sys.executable) -> dict[str, Path]:
    """{kind: GGUF path} of model_dir, written once into workdir (temp name + rename: never half a file)."""
    import importlib.util

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    out = {k: workdir / f"model-{k}.gguf" for k in kinds}
    bf16 = workdir / "model-bf16.gguf"
    if not bf16.exists():
        if python == sys.executable and importlib.util.find_spec("sentencepiece") is None:
            raise LlamaCppError("convert_hf_to_gguf.py needs sentencepiece: pip install 'sentencepiece>=0.1.98,<0.3' "
                                "(benchmarks/build_llama_cpp.sh installs it into .venv)")
        src = conversion_folder(model_dir, workdir / "hf-for-gguf")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in [str(tools.converter.parent / "gguf-py"),
                                                                        os.environ.get("PYTHONPATH", "")] if p))
        tmp = bf16.with_suffix(".part")
        _run([python, str(tools.converter), str(src), "--outtype", "bf16", "--outfile", str(tmp)], "convert_hf_to_gguf.py", env)
        tmp.rename(bf16)
    for k in kinds:
        if k != "bf16" and not out[k].exists():
            tmp = out[k].with_suffix(".part")
            _run([str(tools.quantize), str(bf16), str(tmp), k.upper()], f"llama-quantize {k.upper()}")
            tmp.rename(out[k])
    return out


_TENSOR_BYTES = """import json, sys
from gguf import GGUFReader
r = GGUFReader(sys.argv[1])
print(json.dumps({t.name: [int(t.n_bytes), int(t.n_elements)] for t in r.tensors}))
"""


def gguf_tensor_bytes(tools: LlamaCpp, gguf: Path, python: str = sys.executable) -> dict[str, tuple[int, int]]:
    """{tensor name: (bytes, elements)} of a GGUF file, read with the source tree's gguf-py."""
    env = dict(os.environ, PYTHONPATH=str(tools.converter.parent / "gguf-py"))
    out = _run([python, "-c", _TENSOR_BYTES, str(gguf)], f"reading the tensors of {gguf.name}", env)
    return {k: (v[0], v[1]) for k, v in json.loads(out).items()}


def weight_accounting(tensors: dict[str, tuple[int, int]]) -> dict:
    """Weight bytes, elements and the token-embedding table's bytes (one row read per token; 0 if the
    output head is the same tensor) of a GGUF's tensors."""
    emb = tensors.get("token_embd.weight", (0, 0))[0] if "output.weight" in tensors else 0
    return {"weight_bytes": sum(b for b, _ in tensors.values()), "params": sum(n for _, n in tensors.values()),
            "embedding_bytes": emb}


def parse_llama_bench(text: str) -> dict:
    """{"decode_ms_per_token", "prompt_tokens_per_s", "decode_samples_ms"} from llama-bench's `-o json` output.

    Its records carry n_prompt / n_gen and avg_ts (tokens per second), and in recent versions
    samples_ts (one rate per repetition; the median is reported then): the generation record has
    n_prompt 0 and n_gen > 0, the prompt record the reverse.
    """
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise LlamaCppError(f"llama-bench output is not JSON ({e})") from None
    gen = [r for r in records if r.get("n_gen", 0) > 0 and r.get("n_prompt", 0) == 0]
    pp = [r for r in records if r.get("n_prompt", 0) > 0 and r.get("n_gen", 0) == 0]
    if not gen or not gen[0].get("avg_ts"):
        raise LlamaCppError("llama-bench output has no token-generation record with avg_ts")
    samples = [float(x) for x in gen[0].get("samples_ts") or [] if x]
    rate = statistics.median(samples) if samples else float(gen[0]["avg_ts"])
    return {"decode_ms_per_token": 1e3 / rate, "prompt_tokens_per_s": float(pp[0]["avg_ts"]) if pp else None,
            "decode_samples_ms": [1e3 / s for s in samples]}


def _children_read_bytes() -> int:
    """Bytes fetched from storage by this process's reaped children, all together (getrusage: 512-byte blocks)."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_inblock * 512


def run_counted(cmd: list[str], *, cgroup=None, env=None, timeout: float = 3600) -> dict:
    """Run `cmd` (inside `cgroup`, a prepared cgroup.MemoryCgroup, if given) to completion; its exit status,
    output, wall seconds and the bytes it read from storage (the kernel's read_bytes of the process)."""
    if cgroup is not None:
        cmd = cgroup.wrap(cmd)
    before = _children_read_bytes()
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    return {"returncode": p.returncode, "stdout": p.stdout, "stderr": p.stderr, "seconds": time.perf_counter() - t,
            "read_bytes": _children_read_bytes() - before}


def bench_args(tools: LlamaCpp, gguf: Path, *, threads: int, prompt_tokens: int, new_tokens: int, reps: int,
               streamed: bool) -> list[str]:
    # streamed: no prompt-processing test (it would read the whole file once more per process, untimed by us)
    cmd = [str(tools.bench), "-m", str(gguf), "-t", str(threads), "-p", str(0 if streamed else prompt_tokens),
           "-n", str(new_tokens), "-r", str(reps), "-o", "json"]
    if prompt_tokens and tools.supports("-d"):
        cmd += ["-d", str(prompt_tokens)]
    if streamed:
        if tools.supports("--repack"):
            cmd += ["--repack", "0"]
        if tools.supports("-lm"):
            cmd += ["-lm", "mmap"]
        elif tools.supports("-mmp"):
            cmd += ["-mmp", "1"]
    return cmd


def bench_runs(tools: LlamaCpp, gguf: Path, *, threads: int, prompt_tokens: int, new_tokens: int, reps: int,
               streamed: bool, cgroup=None, on_rep=None, timeout: float = 3600) -> dict:
    """llama-bench on one GGUF file, resident or streamed (see the module docstring); a worker-like result.

    Returns {"decode_s_per_token", "decode_s_per_step", "tokens_per_s", "prefill_s", "bytes_read_per_token",
    "bytes_read_per_step", "reps": [...], "command", "completed", "error"}; with a cgroup, a run that
    fails ends the measurement (completed False, the error's last line kept) instead of raising.
    """
    from ..io import drop_cache

    def one(n_new: int, n_reps: int) -> dict:
        cmd = bench_args(tools, gguf, threads=threads, prompt_tokens=prompt_tokens, new_tokens=n_new, reps=n_reps,
                         streamed=streamed)
        if streamed:
            drop_cache([gguf])
        r = run_counted(cmd, cgroup=cgroup, timeout=timeout)
        r["command"] = cmd
        if r["returncode"] == 0:
            r.update(parse_llama_bench(r["stdout"]))
        elif cgroup is None:
            tail = (r["stderr"] or r["stdout"]).strip().splitlines()[-1:] or ["(no output)"]
            raise LlamaCppError(f"llama-bench on {gguf.name} failed (exit {r['returncode']}): {tail[0]}")
        return r

    out = {"completed": True, "error": None, "reps": []}
    if not streamed:
        if on_rep:
            on_rep(1, 1)
        r = one(new_tokens, reps)
        runs, base = [r], None
        samples = r["decode_samples_ms"] or [r["decode_ms_per_token"]]
        out["reps"] = [{"decode_s_per_token": ms / 1e3} for ms in samples]
    else:
        if on_rep:
            on_rep(0, reps)
        base = one(1, 1)  # the same load, warm-up and context, one token: what N tokens read beyond it is theirs
        runs = [base]
        for i in range(reps):
            if base["returncode"] != 0:
                break
            if on_rep:
                on_rep(i + 1, reps)
            r = one(new_tokens, 1)
            runs.append(r)
            if r["returncode"] != 0:
                break
            per_token = (r["read_bytes"] - base["read_bytes"]) / (new_tokens - 1)
            out["reps"].append({"decode_s_per_token": r["decode_ms_per_token"] / 1e3, "read_bytes": r["read_bytes"],
                                "bytes_read_per_token": max(per_token, 0.0), "seconds": r["seconds"]})
    failed = next((r for r in runs if r["returncode"] != 0), None)
    if failed is not None:
        tail = (failed["stderr"] or failed["stdout"]).strip().splitlines()[-1:] or ["(no output)"]
        out.update(completed=False, error=f"exit {failed['returncode']}: {tail[0]}")
    out["command"] = " ".join(runs[-1]["command"])
    vals = [r["decode_s_per_token"] for r in out["reps"]]
    step = statistics.median(vals) if vals else None
    reads = [r["bytes_read_per_token"] for r in out["reps"] if "bytes_read_per_token" in r]
    pp = [r.get("prompt_tokens_per_s") for r in runs if r.get("prompt_tokens_per_s")]
    out.update(decode_s_per_token=step, decode_s_per_step=step, tokens_per_s=1 / step if step else None,
               prefill_s=prompt_tokens / statistics.median(pp) if pp else None,
               bytes_read_per_token=statistics.median(reads) if reads else None,
               bytes_read_per_step=statistics.median(reads) if reads else None,
               tokens=None, tokens_stable=None, base_read_bytes=base["read_bytes"] if base else None)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-cpp", type=Path, required=True, help="folder of the llama.cpp build (or its bin/)")
    ap.add_argument("--llama-cpp-src", type=Path, default=None, help="llama.cpp source tree (default: found near the build)")
    ap.add_argument("--model", type=Path, required=True, help="Hugging Face checkpoint (the weights sparseferry converts)")
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)
    tools = LlamaCpp(args.llama_cpp, args.llama_cpp_src)
    print("| system | file GB | decode ms/token | effective GB/s |\n|---|---|---|---|")
    for kind, path in gguf_files(tools, args.model, args.workdir).items():
        r = bench_runs(tools, path, threads=args.threads, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                       reps=args.reps, streamed=False)
        acc = weight_accounting(gguf_tensor_bytes(tools, path))
        ms = r["decode_s_per_token"] * 1e3
        print(f"| llama.cpp {kind.upper()} | {path.stat().st_size / 1e9:.3f} | {ms:.1f} | "
              f"{(acc['weight_bytes'] - acc['embedding_bytes']) / ms / 1e6:.1f} |")


if __name__ == "__main__":
    main()
