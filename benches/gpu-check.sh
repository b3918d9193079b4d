#!/usr/bin/env bash
# The one-call GPU check, run on the lent GPU machine from the carried tree:
#   run(command="bash benches/gpu-check.sh", carry=[".gpu"], timeout_s=600)
# (build .gpu/ here first: benches/gpu-build.sh).
#
# Fits what one device call returns: it ends within 540 s (each section has its own timeout,
# cut to what is left of the budget), writes at most 6 files to $OUT (summary.txt, the two bench
# tables, logs.tar.gz with every log and raw output), and prints a summary of at most 6,000
# characters last, so it is what the 12,000-character output tail keeps. Sections, in order of
# value (a later one is what a short budget drops):
#   1. the CUDA tests: the GPU integration tests, the device unit tests, the kernels against
#      their CPU twins (no CPU-only tests) and the one-rank NCCL smoke test (an all-reduce and a
#      send to itself of known tensors); a skip fails the check, as on this machine they must run;
#   2. brigade bench on GPT-2 124M (batch 8 x 1024), 1/2/4 stages on cuda:0, bf16 then f32:
#      tokens/s, MFU (against the GPU's peak from the table below), peak memory;
#   3. PyTorch eager on the same model, bf16 and f32, for the ratio per row;
#   4. the kernels, brigade's (`brigade kernels-bench`) and PyTorch's (benches/torch_kernels.py);
#   5. torch.compile, last (its compilation alone can take a minute).
# Set BRIGADE_CHECK_BUDGET (seconds, default 540) to shorten it.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-out}
mkdir -p "$out"
work=$(mktemp -d)
budget=${BRIGADE_CHECK_BUDGET:-540}
# Seconds left for a section that asks for $1: its own cap, less what the whole check has left
# (10 s kept for the summary and the archive); 0 when nothing is left.
left() {
  local rest=$((budget - 10 - SECONDS))
  if [ "$rest" -le 0 ]; then echo 0; elif [ "$1" -lt "$rest" ]; then echo "$1"; else echo "$rest"; fi
}
# Runs "$@" under a timeout of at most $1 s (the section's cap), logging to $work/$2.log.
section() {
  local cap=$1 name=$2; shift 2
  local t; t=$(left "$cap")
  if [ "$t" -le 0 ]; then echo "skipped (no time left): $name" | tee -a "$work/skipped.txt"; return 124; fi
  echo "-- $name (up to ${t}s)"
  timeout --kill-after=5 "$t" "$@" >"$work/$name.log" 2>&1
  local rc=$?
  [ "$rc" -eq 124 ] && echo "timed out after ${t}s: $name" | tee -a "$work/skipped.txt"
  tail -n 3 "$work/$name.log"
  return $rc
}

echo "== setup"
if [ -f .gpu/device-env.sh ]; then . .gpu/device-env.sh; fi
echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}" | tee "$work/env.txt"
if [ -f .gpu/bundle.tar.xz ]; then
  python3 -c 'import tarfile; tarfile.open(".gpu/bundle.tar.xz").extractall(".gpu")' \
    || { echo "error: cannot unpack .gpu/bundle.tar.xz: rebuild it here with benches/gpu-build.sh"; exit 1; }
fi
[ -x .gpu/brigade ] || { echo "error: no .gpu/brigade: build it here with benches/gpu-build.sh and carry .gpu"; exit 1; }
# The CUDA libraries the binary links: what the loader finds, and one error line if any is missing.
ldd .gpu/brigade >"$work/ldd.txt" 2>&1
grep -E 'libcuda|cublas|curand|nvrtc|cudart|nccl' "$work/ldd.txt" | sed 's/ (0x.*//' | tee -a "$work/env.txt"
missing=$(grep 'not found' "$work/ldd.txt" | awk '{print $1}' | tr '\n' ' ')
if [ -n "$missing" ]; then
  echo "error: CUDA libraries not found: $missing- fix: source .gpu/device-env.sh (PyTorch's nvidia/* wheels" \
       "on LD_LIBRARY_PATH) or install the CUDA 13 runtime; libcuda.so.1 comes with the NVIDIA driver" | tee -a "$work/env.txt"
fi
gpu_name=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$work/gpu.txt" 2>&1
echo "GPU: ${gpu_name:-none (nvidia-smi failed)}"
# Dense peaks by GPU name (NVIDIA data sheets): bf16 tensor-core FLOP/s, f32 (non-tensor) FLOP/s,
# memory bandwidth GB/s. An unknown GPU falls back to H100 SXM's, and says so.
read -r peak_name peak_bf16 peak_f32 peak_gbps < <(case "$gpu_name" in
  *H200*) echo "H200 989e12 67e12 4800" ;;
  *H100*PCIe*) echo "H100-PCIe 756e12 51e12 2000" ;;
  *H100*NVL*) echo "H100-NVL 835e12 60e12 3900" ;;
  *H100*) echo "H100-SXM 989e12 67e12 3350" ;;
  *A100*80GB*) echo "A100-80GB 312e12 19.5e12 2039" ;;
  *A100*) echo "A100-40GB 312e12 19.5e12 1555" ;;
  *) echo "unknown(H100-SXM-assumed) 989e12 67e12 3350" ;;
esac)
echo "peaks: $peak_name bf16 $peak_bf16 FLOP/s, f32 $peak_f32 FLOP/s, $peak_gbps GB/s" | tee -a "$work/env.txt"
status=0

echo "== 1. CUDA tests"
# The GPU-relevant tests of each binary only (a filter per binary): the CPU suite runs in CI.
for t in .gpu/tests/*; do
  [ -x "$t" ] || continue
  base=$(basename "$t")
  case "$base" in
    gpu-*) filter=() cap=150 ;;
    brigade_engine-*) filter=(device) cap=20 ;;
    brigade_kernels-*) filter=(cuda) cap=30 ;;
    kernels-*) filter=(cuda::) cap=60 ;;
    # The one-rank NCCL smoke test; the Open MPI it links came along in .gpu/tests/lib.
    nccl-*) filter=() cap=60 ;;
    *) continue ;;
  esac
  libs=${LD_LIBRARY_PATH:-}
  [[ $base == nccl-* ]] && libs=".gpu/tests/lib${libs:+:$libs}"
  section "$cap" "test-${base%-*}" env LD_LIBRARY_PATH="$libs" "$t" "${filter[@]}" --test-threads 1 || status=1
  grep -q 'SKIPPED' "$work/test-${base%-*}.log" && { echo "a test skipped on the GPU machine: ${base%-*}"; status=1; }
  grep -q 'test result: ok. 0 passed' "$work/test-${base%-*}.log" && { echo "no test ran: ${base%-*}"; status=1; }
done

echo "== 2. brigade bench: GPT-2 124M, batch 8 x 1024, 1/2/4 stages on cuda:0"
# GPU memory in use, sampled every 200 ms (stages share the GPU, so this is their total).
nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 >"$work/memory-samples.txt" 2>/dev/null &
sampler=$!
for dtype in bf16 f32; do
  section 100 "bench-$dtype" .gpu/brigade bench --model gpt2 --device cuda:0 --dtype "$dtype" --layouts 1,2,4 \
    --schedules 1f1b --microbatches 8 --batch-size 8 --steps 3 --warmup 1 --profile-repeats 1 --plain --in-process \
    --out "$work/bench-$dtype" || status=1
  [ -f "$work/bench-$dtype/bench.json" ] && cp "$work/bench-$dtype/bench.json" "$out/bench-$dtype.json"
done
kill "$sampler" 2>/dev/null

echo "== 3. PyTorch eager, same model"
torch_gpt=(python3 .gpu/torch_gpt.py --layers 12 --dim 768 --heads 12 --ctx 1024 --vocab 50304 --batch 8 --steps 10
  --warmup 2 --device cuda --fused-adamw)
for dtype in bf16 f32; do section 45 "torch-$dtype" "${torch_gpt[@]}" --dtype "$dtype"; done

echo "== 4. kernels: brigade vs PyTorch at GPT-2 124M shapes (%peak against $peak_gbps GB/s)"
for dtype in bf16 f32; do
  section 25 "kernels-brigade-$dtype" .gpu/brigade kernels-bench --device cuda --dtype "$dtype" --peak-gbps "$peak_gbps" \
    || status=1
  section 25 "kernels-torch-$dtype" python3 .gpu/torch_kernels.py --device cuda --dtype "$dtype" --peak-gbps "$peak_gbps"
done

echo "== 5. torch.compile, bf16"
section 90 torch-compile-bf16 "${torch_gpt[@]}" --dtype bf16 --compile

echo "== summary"
python3 - "$work" "$out/summary.txt" "$status" "$peak_name" "$peak_bf16" "$peak_f32" "${gpu_name:-none}" <<'PY'
import glob, json, os, re, sys
work, dest, status, peak_name, peak_bf16, peak_f32, gpu = sys.argv[1:8]
peaks = {"bf16": float(peak_bf16), "f32": float(peak_f32)}
lines = [f"GPU: {gpu}; peaks {peak_name}: bf16 {peaks['bf16']/1e12:.0f} TFLOP/s, f32 {peaks['f32']/1e12:.1f} TFLOP/s"]
env = open(os.path.join(work, "env.txt")).read().splitlines()
lines += [l for l in env if l.startswith("error:")]
lines.append("tests (binary: passed/failed/skipped; failures and skips by name):")
for log in sorted(glob.glob(os.path.join(work, "test-*.log"))):
    text = open(log, errors="replace").read()
    name = os.path.basename(log)[5:-4]
    ok = re.findall(r"^test (\S+) \.\.\. ok", text, re.M)
    bad = re.findall(r"^test (\S+) \.\.\. FAILED", text, re.M)
    skipped = sorted(set(re.findall(r"SKIPPED (\S+?):", text)))
    # A skip's stderr line can split "test x ... ok", so the counts come from libtest's result line.
    result = re.search(r"^test result: \S+ (\d+) passed; (\d+) failed", text, re.M)
    done = result is not None
    passed, failed = (int(result[1]), int(result[2])) if result else (len(ok), len(bad))
    state = "" if done else " (did not finish: timeout or crash)"
    if done and passed + failed == 0:
        state = " (no test ran: a build without --features cuda?)"
    lines.append(f"  {name}: {passed - len(skipped)} passed, {failed} failed, {len(skipped)} skipped{state}")
    if name.startswith("gpu"):
        lines += [f"    ok {t}" for t in ok if t not in skipped]
    lines += [f"    FAILED {t}" for t in bad] + [f"    SKIPPED {t}" for t in skipped]
    if not done:
        lines += ["    | " + l[:150] for l in text.strip().splitlines()[-3:]]
torch = {}
for dtype in ("bf16", "f32"):
    try:
        last = open(os.path.join(work, f"torch-{dtype}.log")).read().strip().splitlines()[-1]
        torch[dtype] = json.loads(last)
    except (OSError, IndexError, ValueError):
        pass
params = 124_475_904
lines.append("bench GPT-2 124M, batch 8x1024, 1f1b (tok/s | MFU: 6*params*tok/s over the dtype's peak, f32 without TF32 | "
             "peak mem/stage | x PyTorch eager, same dtype):")
for dtype in ("bf16", "f32"):
    path = os.path.join(work, f"bench-{dtype}", "bench.json")
    try:
        data = json.load(open(path))
    except (OSError, ValueError):
        lines.append(f"  {dtype}: no bench.json (see logs.tar.gz: bench-{dtype}.log)")
        continue
    rows = data["rows"] if isinstance(data, dict) else data
    eager = torch.get(dtype, {}).get("tokens_per_s")
    for r in rows:
        tps = r.get("throughput") or 0.0
        mem = r.get("peak_memory_bytes")
        mem = f"{max(mem) / 2**30:.1f} GiB" if isinstance(mem, list) and mem else (f"{mem / 2**30:.1f} GiB" if isinstance(mem, (int, float)) else "?")
        ratio = f"{tps / eager:.2f}" if eager else "?"
        lines.append(f"  {dtype} p={r.get('stages')} m={r.get('microbatches')}: {tps:,.0f} tok/s | "
                     f"MFU {6 * params * tps / peaks[dtype] * 100:.1f}% | {mem} | x{ratio}")
for dtype, t in torch.items():
    lines.append(f"  torch eager {dtype}: {t['tokens_per_s']:,.0f} tok/s, peak {(t.get('peak_mem_bytes') or 0) / 2**30:.1f} GiB")
try:
    last = open(os.path.join(work, "torch-compile-bf16.log")).read().strip().splitlines()[-1]
    lines.append(f"  torch compile bf16: {json.loads(last)['tokens_per_s']:,.0f} tok/s")
except (OSError, IndexError, ValueError, KeyError):
    lines.append("  torch compile bf16: no result")
try:
    samples = [int(x) for x in open(os.path.join(work, "memory-samples.txt")).read().split() if x.isdigit()]
    lines.append(f"peak GPU memory in use during the benches (nvidia-smi): {max(samples)} MiB")
except (OSError, ValueError):
    pass
lines.append("kernels (median ms, %peak) brigade | torch:")
for dtype in ("bf16", "f32"):
    def table(who):
        rows = {}
        try:
            for l in open(os.path.join(work, f"kernels-{who}-{dtype}.log")):
                f = l.split()
                if len(f) >= 6 and not l.startswith("#") and f[0] != "kernel":
                    try:
                        rows[f[0]] = (float(f[3]), f[5])
                    except ValueError:
                        pass
        except OSError:
            pass
        return rows
    b, t = table("brigade"), table("torch")
    if not b and not t:
        lines.append(f"  {dtype}: no kernel tables")
    for k in sorted(set(b) | set(t)):
        fmt = lambda r: f"{r[0]:.3f} ms {r[1]}%" if r else "-"
        lines.append(f"  {dtype} {k[:32]}: {fmt(b.get(k))} | {fmt(t.get(k))}")
try:
    lines += ["not run: " + l.strip() for l in open(os.path.join(work, "skipped.txt"))]
except OSError:
    pass
lines.append(f"check: {'PASS' if status == '0' else 'FAIL'} (logs: logs.tar.gz)")
text = "\n".join(lines) + "\n"
if len(text) > 6000:
    text = text[:5900] + "\n... (summary cut at 6,000 characters; full in summary.txt)\n" + lines[-1] + "\n"
open(dest, "w").write("\n".join(lines) + "\n")
print(text, end="")
PY
cp "$out/summary.txt" "$work/" 2>/dev/null
tar -C "$work" -czf "$out/logs.tar.gz" . 2>/dev/null
rm -rf "$work"
exit $status
