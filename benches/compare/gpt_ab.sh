#!/usr/bin/env bash
# Quiet side-by-side: new vs base brigade vs PyTorch, alternating, R rounds.
# usage: benches/compare/gpt_ab.sh NEW_BIN BASE_BIN [ROUNDS]  (MPIBIN / MPIBASE=mpi-feature builds add 2-rank rows)
# PyTorch from /tmp/pyref (see ../shared/peers/README.md).
set -u
NEW=$1; BASE=$2; R=${3:-3}; PY=${PEERS_PY:-/tmp/pyref/bin/python}; P=$(cd "$(dirname "$0")/../../../shared/peers" && pwd)
M="--layers 4 --width 256 --heads 4 --context 128 --vocab 256 --batch-size 16 --steps 12 --eval-every 0 --eval-batches 1 --plain"
O=${OUT:-/tmp}/gpt_ab.raw; : > $O
b() { local bin=$1; shift; "$bin" train $M "$@" 2>&1 | sed -n 's/^median step \([0-9.]*\)s.*/\1/p'; }
for r in $(seq "$R"); do
  echo "new_1s_2t $(b $NEW --stages 1 --microbatches 1 --threads-per-stage 2)" >>$O
  echo "base_1s_2t $(b $BASE --stages 1 --microbatches 1 --threads-per-stage 2)" >>$O
  echo "torch_2t $(OMP_NUM_THREADS=2 $PY $P/torch_gpt.py --threads 2 --steps 12 | sed -n 's/.*"step_s": \([0-9.]*\).*/\1/p')" >>$O
  echo "new_1s_1t $(b $NEW --stages 1 --microbatches 1 --threads-per-stage 1)" >>$O
  echo "base_1s_1t $(b $BASE --stages 1 --microbatches 1 --threads-per-stage 1)" >>$O
  echo "torch_1t $(OMP_NUM_THREADS=1 $PY $P/torch_gpt.py --threads 1 --steps 12 | sed -n 's/.*"step_s": \([0-9.]*\).*/\1/p')" >>$O
  echo "new_2s_1f1b $(b $NEW --stages 2 --microbatches 8 --schedule 1f1b --threads-per-stage 1)" >>$O
  echo "new_2s_1f1b_perstage $(b $NEW --stages 2 --microbatches 8 --schedule 1f1b --threads-per-stage 1 --thread-pools per-stage)" >>$O
  echo "base_2s_1f1b $(b $BASE --stages 2 --microbatches 8 --schedule 1f1b --threads-per-stage 1)" >>$O
  echo "torchpp_1f1b $(cd $P && OMP_NUM_THREADS=1 /tmp/pyref/bin/torchrun --nproc-per-node 2 torch_pipe.py --schedule 1f1b --microbatches 8 --steps 12 2>/dev/null | sed -n 's/.*"step_s": \([0-9.]*\).*/\1/p')" >>$O
  echo "new_2s_gpipe $(b $NEW --stages 2 --microbatches 8 --schedule gpipe --threads-per-stage 1)" >>$O
  echo "new_2s_gpipe_perstage $(b $NEW --stages 2 --microbatches 8 --schedule gpipe --threads-per-stage 1 --thread-pools per-stage)" >>$O
  echo "torchpp_gpipe $(cd $P && OMP_NUM_THREADS=1 /tmp/pyref/bin/torchrun --nproc-per-node 2 torch_pipe.py --schedule gpipe --microbatches 8 --steps 12 2>/dev/null | sed -n 's/.*"step_s": \([0-9.]*\).*/\1/p')" >>$O
  for pair in "new:${MPIBIN:-}" "base:${MPIBASE:-}"; do
    [ -n "${pair#*:}" ] || continue
    echo "${pair%%:*}_2ranks_1f1b $(OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 mpirun --oversubscribe -n 2 ${pair#*:} train $M --stages 2 --microbatches 8 --schedule 1f1b --threads-per-stage 1 2>&1 | sed -n 's/^median step \([0-9.]*\)s.*/\1/p' | head -1)" >>$O
  done
done
$PY "$(dirname "$0")/medians.py" $O
