"""llama.cpp side by side: GGUF files from the same weights, and decode speed from `llama-bench`.

Given a llama.cpp build (benchmarks/build_llama_cpp.sh prints its folder):
  - `gguf_files` writes the model as GGUF: bf16 with llama.cpp's own `convert_hf_to_gguf.py` (from the
    source tree next to the build), then Q8_0 and Q4_0 with its `llama-quantize`. The weights are the
    checkpoint sparseferry converts (pruned: zeros stored densely, as llama.cpp has no sparse format).
  - `llama_bench` runs `llama-bench -p PROMPT -n NEW -t THREADS -r REPS -o json` and reads the
    decode (token generation) and prompt rates from its JSON records.
Nothing here is used by the tests' models or in CI: it needs a compiled llama.cpp.

    python -m sparseferry.bench.llama_cpp --llama-cpp DIR --model MODEL_DIR --workdir W [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from ..errors import SparseferryError

KINDS = ("bf16", "q8_0", "q4_0")  # GGUF encodings compared: llama.cpp's bf16 and its two block quantizations


class LlamaCppError(SparseferryError):
    """The llama.cpp build is missing a tool, or a tool failed."""


def find_tool(root: Path, name: str) -> Path:
    """`name` (e.g. llama-bench) in root, root/bin or root/build/bin."""
    for d in (root, root / "bin", root / "build" / "bin"):
        if (d / name).is_file() and os.access(d / name, os.X_OK):
            return d / name
    raise LlamaCppError(f"{root}: no executable {name} in it, bin/ or build/bin/ (build it with benchmarks/build_llama_cpp.sh)")


def find_converter(root: Path) -> Path:
    """llama.cpp's convert_hf_to_gguf.py in the source tree under root (as the build script unpacks it)."""
    hits = sorted(root.glob("convert_hf_to_gguf.py")) + sorted(root.glob("*/llama.cpp/convert_hf_to_gguf.py"))
    hits += sorted(root.glob("*/convert_hf_to_gguf.py"))
    if not hits:
        raise LlamaCppError(f"{root}: no llama.cpp source tree with convert_hf_to_gguf.py under it")
    return hits[0]


def _run(cmd: list[str], what: str, env=None) -> str:
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode:
        tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise LlamaCppError(f"{what} failed (exit {p.returncode}): {tail[0]}")
    return p.stdout


def gguf_files(root: Path, model_dir: Path, workdir: Path, kinds=KINDS) -> dict[str, Path]:
    """{kind: GGUF path} of model_dir, written once into workdir (temp name + rename: never half a file)."""
    workdir.mkdir(parents=True, exist_ok=True)
    out = {k: workdir / f"model-{k}.gguf" for k in kinds}
    bf16 = workdir / "model-bf16.gguf"
    if not bf16.exists():
        conv = find_converter(root)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(conv.parent / "gguf-py"), os.environ.get("PYTHONPATH", "")]))
        tmp = bf16.with_suffix(".part")
        _run([sys.executable, str(conv), str(model_dir), "--outtype", "bf16", "--outfile", str(tmp)], "convert_hf_to_gguf.py", env)
        tmp.rename(bf16)
    for k in kinds:
        if k != "bf16" and not out[k].exists():
            tmp = out[k].with_suffix(".part")
            _run([str(find_tool(root, "llama-quantize")), str(bf16), str(tmp), k.upper()], f"llama-quantize {k.upper()}")
            tmp.rename(out[k])
    return out


def parse_llama_bench(text: str) -> dict:
    """{"decode_ms_per_token", "prompt_tokens_per_s"} from llama-bench's `-o json` output.

    Its records carry n_prompt / n_gen and avg_ts (tokens per second): the generation record has
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
    return {"decode_ms_per_token": 1e3 / float(gen[0]["avg_ts"]),
            "prompt_tokens_per_s": float(pp[0]["avg_ts"]) if pp else None}


def llama_bench(root: Path, gguf: Path, *, threads: int, prompt_tokens: int, new_tokens: int, reps: int) -> dict:
    out = _run([str(find_tool(root, "llama-bench")), "-m", str(gguf), "-t", str(threads), "-p", str(prompt_tokens),
                "-n", str(new_tokens), "-r", str(reps), "-o", "json"], f"llama-bench on {gguf.name}")
    return parse_llama_bench(out) | {"file_bytes": gguf.stat().st_size}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-cpp", type=Path, required=True, help="folder of the llama.cpp build")
    ap.add_argument("--model", type=Path, required=True, help="Hugging Face checkpoint (the weights sparseferry converts)")
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)
    print("| system | file GB | decode ms/token | effective GB/s |\n|---|---|---|---|")
    for kind, path in gguf_files(args.llama_cpp, args.model, args.workdir).items():
        r = llama_bench(args.llama_cpp, path, threads=args.threads, prompt_tokens=args.prompt_tokens,
                        new_tokens=args.new_tokens, reps=args.reps)
        ms = r["decode_ms_per_token"]
        print(f"| llama.cpp {kind.upper()} | {r['file_bytes'] / 1e9:.3f} | {ms:.1f} | {r['file_bytes'] / ms / 1e6:.1f} |")


if __name__ == "__main__":
    main()
