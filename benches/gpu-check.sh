#!/usr/bin/env bash
# The one-command GPU check, run on the lent GPU machine from the carried tree:
#   run(command="bash benches/gpu-check.sh", carry=[".gpu"])   (build .gpu/ first: benches/gpu-build.sh)
# Budget: under 9 minutes. Writes everything under $OUT (or ./gpu-out).
#   1. the CUDA tests (a skip fails the check: on this machine they must run);
#   2. brigade bench on GPT-2 124M (batch 8 x 1024) at 1, 2 and 4 stages on one GPU, f32 and
#      bf16: tokens/s, MFU, memory;
#   3. PyTorch eager (and torch.compile) on the same model, for the ratio;
#   4. the kernel benchmarks, brigade's (`brigade kernels-bench`) and PyTorch's
#      (benches/torch_kernels.py), f32 and bf16.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-out}
mkdir -p "$out"
. .gpu/device-env.sh
python3 -c 'import tarfile; tarfile.open(".gpu/bundle.tar.xz").extractall(".gpu")' || { echo "cannot unpack .gpu/bundle.tar.xz (run benches/gpu-build.sh here first)"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
status=0

echo "== CUDA tests"
for t in .gpu/tests/*; do
  if ! timeout 240 "$t" --test-threads 1 2>&1 | tee "$out/test-$(basename "$t").log" | grep -E 'test result|FAILED|panicked|SKIPPED|error'; then
    status=1
  fi
  if grep -q 'SKIPPED' "$out/test-$(basename "$t").log"; then echo "a test skipped on the GPU machine"; status=1; fi
  grep -q 'test result: ok' "$out/test-$(basename "$t").log" || status=1
done

echo "== brigade bench: GPT-2 124M, batch 8 x 1024, 1/2/4 stages on cuda:0"
# GPU memory in use, sampled every 200 ms while the benches run (stages share the GPU, so this
# is their total; bench.json's per-stage memory is brigade's own accounting).
nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$out/memory-samples.txt" &
sampler=$!
for dtype in bf16 f32; do
  timeout 150 .gpu/brigade bench --model gpt2 --device cuda:0 --dtype "$dtype" --layouts 1,2,4 --schedules 1f1b \
      --microbatches 8 --batch-size 8 --steps 4 --warmup 2 --profile-repeats 3 --plain --in-process \
      --out "$out/bench-$dtype" 2>&1 | tail -15 || status=1
done
kill $sampler 2>/dev/null
echo "peak GPU memory used during the benches: $(sort -n "$out/memory-samples.txt" | tail -1) MiB"
python3 - "$out" <<'PY' || true
import json, sys, glob
# MFU: 6 * params * tokens/s over the H100/H200 dense peak (bf16 989 TFLOP/s; f32 on tensor
# cores is TF32-less in candle, so f32 is reported against the 67 TFLOP/s FP32 peak).
peaks = {"bf16": 989e12, "f32": 67e12}
for path in sorted(glob.glob(sys.argv[1] + "/bench-*/bench.json")):
    dtype = path.split("bench-")[1].split("/")[0]
    data = json.load(open(path))
    rows = data["rows"] if isinstance(data, dict) else data
    for r in rows:
        params = 124_475_904
        tps = r["throughput"]
        print(f"{dtype} p={r['stages']} m={r['microbatches']}: {tps:,.0f} tok/s, step {r['step_s']['median']*1e3:.1f} ms, "
              f"MFU {6*params*tps/peaks[dtype]*100:.1f}%, memory per stage {r.get('peak_memory_bytes')}")
PY

echo "== PyTorch eager and compiled, same model"
for extra in "" "--compile"; do
  timeout 150 python3 .gpu/torch_gpt.py --layers 12 --dim 768 --heads 12 --ctx 1024 --vocab 50304 --batch 8 \
      --device cuda --dtype bf16 --fused-adamw $extra 2>&1 | tail -2 | tee -a "$out/torch.txt"
done

echo "== kernels: brigade vs PyTorch at GPT-2 124M shapes (%peak against PEAK_GBPS, default 4800: H200 HBM3e)"
for dtype in f32 bf16; do
  timeout 60 .gpu/brigade kernels-bench --device cuda --dtype "$dtype" --peak-gbps "${PEAK_GBPS:-4800}" 2>&1 \
    | tee -a "$out/kernels.txt" || status=1
  timeout 60 python3 .gpu/torch_kernels.py --device cuda --dtype "$dtype" --peak-gbps "${PEAK_GBPS:-4800}" 2>&1 \
    | tee -a "$out/kernels.txt"
done
exit $status
