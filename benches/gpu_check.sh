#!/usr/bin/env bash
# The kernels' GPU check in one command, on a machine with an NVIDIA GPU (run from the repo root):
#   1. the CUDA kernels against their CPU twins (kernels/tests/kernels/cuda.rs: flash attention
#      f32/bf16 fwd+bwd, multi-tensor AdamW bit for bit) and the kernel-name test;
#   2. `brigade kernels-bench` (f32 and bf16) next to benches/torch_kernels.py on the same shapes.
# PEAK_GBPS (default 4800, an H200's HBM3e) sets the bandwidth the %peak column divides by.
# Needs nvcc (../shared/cuda/toolchain.sh, or a CUDA install) and, for step 2's PyTorch half,
# python3 with torch; without torch that half is skipped with a note.
set -euo pipefail
peak=${PEAK_GBPS:-4800}
if [ -x ../shared/cuda/toolchain.sh ] && ! command -v nvcc >/dev/null; then
  eval "$(../shared/cuda/toolchain.sh)"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
cargo test --release -p brigade-kernels --features cuda --test kernels cuda -- --nocapture
cargo test --release -p brigade-kernels --features cuda --lib
cargo build --release -p brigade --features cuda
for dtype in f32 bf16; do
  echo "== brigade, $dtype"
  ./target/release/brigade kernels-bench --device cuda --dtype "$dtype" --peak-gbps "$peak"
  if python3 -c "import torch" 2>/dev/null; then
    echo "== torch, $dtype"
    python3 benches/torch_kernels.py --device cuda --dtype "$dtype" --peak-gbps "$peak"
  else
    echo "== torch: not installed here, skipped"
  fi
done
