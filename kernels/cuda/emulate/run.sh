#!/usr/bin/env bash
# Builds and runs the host emulation of every kernel in brigade.cu (no GPU
# needed): g++ compiles the .cu source against cuda_shim.h and include/cuda_bf16.h.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${TMPDIR:-/tmp}/brigade-kernels-emulate
g++ -std=c++20 -O2 -pthread -x c++ -I "$here/include" -Wno-unknown-pragmas -o "$out" "$here/check_kernels.cpp"
exec "$out"
