#!/usr/bin/env bash
# Build llama.cpp's llama-server from the llama.cpp sources vendored in the llama-cpp-python
# sdist of the version idlegrid pins, with the same portable CPU variant flags as our engine
# wheel (never -march=native: this class of machine advertises AMX the VM has not enabled).
# Idempotent: a finished build is reused. Prints the binary's path on its last line.
#   bench/build_llama_server.sh            (default dir /work/llama-server-build)
#   LLAMA_SERVER_BUILD=DIR PYTHON=.venv/bin/python bench/build_llama_server.sh
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
py="${PYTHON:-$repo/.venv/bin/python}"
[ -x "$py" ] || py=/work/main/.venv/bin/python
dir="${LLAMA_SERVER_BUILD:-/work/llama-server-build}"
bin="$dir/build/bin/llama-server"
if [ -x "$bin" ]; then
  echo "$bin"
  exit 0
fi
mkdir -p "$dir"
version=$(PYTHONPATH="$repo/src" "$py" -c 'from idlegrid.engines.llama_build import LLAMA_CPP_PYTHON as v; print(v)')
sdist="$dir/llama_cpp_python-$version.tar.gz"
if [ ! -f "$sdist" ]; then
  "$py" -m pip download -q --no-binary :all: --no-deps -d "$dir" "llama-cpp-python==$version"
fi
src="$dir/llama_cpp_python-$version/vendor/llama.cpp"
[ -d "$src" ] || tar -xzf "$sdist" -C "$dir"
# The engine's own flags for this machine's canonical variant (x86-64-v3 here).
read -r -a flags < <(PYTHONPATH="$repo/src" "$py" -c '
from idlegrid.engines.llama_build import cmake_args, default_variant
print(" ".join(cmake_args("cpu", default_variant())))')
cmake -S "$src" -B "$dir/build" -G Ninja -DCMAKE_BUILD_TYPE=Release "${flags[@]}" \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON \
  -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF >"$dir/cmake.log"
cmake --build "$dir/build" --target llama-server -j2 >"$dir/build.log"
echo "$bin"
