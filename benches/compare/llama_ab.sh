#!/usr/bin/env bash
set -u
# usage: benches/compare/llama_ab.sh NEW_BIN BASE_BIN [ROUNDS]: brigade (two builds) vs Hugging Face Llama, alternating.
NEW=$1; BASE=$2; R=${3:-3}; PY=${PEERS_PY:-/tmp/pyref/bin/python}; P=$(cd "$(dirname "$0")/../../../shared/peers" && pwd)
M="--model llama-tiny --layers 4 --width 256 --heads 4 --kv-heads 2 --ffn 688 --context 128 --vocab 256 --batch-size 16 --steps 12 --stages 1 --microbatches 1 --eval-every 0 --eval-batches 1 --plain"
O=${OUT:-/tmp}/llama_ab.raw; : > $O
b() { local bin=$1; shift; "$bin" train $M "$@" 2>&1 | sed -n 's/^median step \([0-9.]*\)s.*/\1/p'; }
for r in $(seq "$R"); do
  for t in 2 1; do
    echo "new_${t}t $(b $NEW --threads-per-stage $t)" >>$O
    echo "base_${t}t $(b $BASE --threads-per-stage $t)" >>$O
    echo "torch_${t}t $(OMP_NUM_THREADS=$t $PY $P/torch_llama.py --threads $t --steps 12 | sed -n 's/.*"step_s": \([0-9.]*\).*/\1/p')" >>$O
  done
done
$PY "$(dirname "$0")/medians.py" $O
