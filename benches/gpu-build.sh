#!/usr/bin/env bash
# Builds everything the GPU check needs, here (no GPU needed), into .gpu/ (git-ignored), for
# the device tool to carry: the cuda `brigade` binary, the CUDA test binaries (and the NCCL
# smoke test with the Open MPI libraries it links), the PyTorch peer
# and the library-path script. Then, on the lent machine, in one call:
#   run(command="bash benches/gpu-check.sh", carry=[".gpu"])
# Uses the pinned CUDA 13.0 toolchain (../shared/cuda/toolchain.sh) and its own target directory
# (CARGO_TARGET_DIR, default ../target-cuda) so the CPU build is not rebuilt.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(../shared/cuda/toolchain.sh)"
target=${CARGO_TARGET_DIR:-../target-cuda}
rm -rf .gpu && mkdir -p .gpu/tests
# Every target type-checks with the feature first, with every error shown: a broken GPU path
# stops the build here, before anything is packed.
cargo check --release --features cuda --target-dir "$target" --workspace --all-targets
cargo build --release --features cuda --target-dir "$target" --bin brigade
strip -o .gpu/brigade "$target/release/brigade"
# Test binaries: the GPU integration tests (brigade), the device unit tests (engine),
# the kernels against their CPU twins (kernels). `--message-format` names each executable.
test_binaries() {
  local features=$1; shift
  # json-render-diagnostics: the JSON on stdout names the executables, and warnings and errors
  # still reach the terminal (stderr), rendered as usual.
  cargo test --release --features "$features" --target-dir "$target" --no-run --message-format=json-render-diagnostics "$@" \
    | python3 -c '
import json, sys
for line in sys.stdin:
    try: m = json.loads(line)
    except ValueError: continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        print(m["executable"])' \
    | while read -r exe; do strip -o ".gpu/tests/$(basename "$exe")" "$exe"; done
}
# Only the binaries with GPU tests (gpu-check.sh filters each to its GPU tests).
test_binaries cuda -p brigade --test gpu
test_binaries cuda -p brigade-engine --lib
test_binaries cuda -p brigade-kernels --lib --test kernels
# The one-rank NCCL smoke test (engine/tests/nccl.rs, `nccl` feature: needs MPI here). It links
# Open MPI, which the GPU machine lacks: the libraries it loads, other than the C runtime and
# the CUDA ones device-env.sh provides, travel in .gpu/tests/lib (one rank never starts MPI).
test_binaries nccl -p brigade-engine --test nccl
mkdir -p .gpu/tests/lib
for t in .gpu/tests/nccl-*; do
  ldd "$t" | awk '/=> \// {print $3}' \
    | grep -vE '/(libc|libm|libdl|librt|libpthread|libgcc_s|libstdc\+\+|ld-linux[^/]*|libcuda|libcublas[^/]*|libcurand|libcudart|libnvrtc|libnccl)\.so' \
    | while read -r lib; do cp -L "$lib" .gpu/tests/lib/; done
done
cp ../shared/cuda/device-env.sh ../shared/peers/torch_gpt.py benches/torch_kernels.py .gpu/
# The device tool carries 64 MiB at most and the binaries are ~260 MB (candle and cudarc in
# each): one xz archive of ~35 MB, which gpu-check.sh unpacks there with Python's tarfile.
tar -C .gpu -cf - brigade tests | xz -T2 -6 > .gpu/bundle.tar.xz
rm -rf .gpu/brigade .gpu/tests
size=$(stat -c %s .gpu/bundle.tar.xz)
ls -la .gpu
if [ "$size" -gt $((60 * 1024 * 1024)) ]; then
  echo "error: .gpu/bundle.tar.xz is $size bytes, over what the device tool carries" >&2
  exit 1
fi
