#!/usr/bin/env bash
# Dump throughput on CPU with 1 process and with K torchrun ranks writing one store
# (docs/benchmarks.md, "torchrun and shared tables").
#
# Run from the repository root:  bash pipelines/torchrun_dump_bench.sh
# Overrides: PYTHON, TEACHER (resnet18), DATASET (fake:4096:32:100), BATCH (256), RANKS (2),
# ROUNDS (2), OUT (a folder for the stores, default a temporary one).
# Each round runs, in turn: one process with all the cores' threads, one process with one
# thread, and RANKS ranks with cores/RANKS threads each; it prints the wall time of each whole
# command (interpreter start and process group included) and the dump's own wall time.
set -euo pipefail

PYTHON=${PYTHON:-python3}
TEACHER=${TEACHER:-resnet18}
DATASET=${DATASET:-fake:4096:32:100}
BATCH=${BATCH:-256}
RANKS=${RANKS:-2}
ROUNDS=${ROUNDS:-2}
CORES=$(nproc)
OUT=${OUT:-$(mktemp -d)}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
DUMP=(dump-teacher --teacher "$TEACHER" --dataset "$DATASET" --batch-size "$BATCH" --device cpu
      --encoding float16 --overwrite)

timed() {  # timed LABEL COMMAND...: one line "LABEL command_s=... dump: ..."
    local label=$1; shift
    local started ended report
    started=$(date +%s.%N)
    report=$("$@" 2>/dev/null | grep '^wrote')
    ended=$(date +%s.%N)
    echo "$label command_s=$(echo "$ended - $started" | bc) dump: ${report##*, }"
}

for round in $(seq "$ROUNDS"); do
    echo "round $round ($CORES cores, $TEACHER on $DATASET, batch $BATCH)"
    OMP_NUM_THREADS=$CORES timed "1 process, $CORES threads" \
        "$PYTHON" -m kdcache "${DUMP[@]}" --out "$OUT/one.zarr"
    OMP_NUM_THREADS=1 timed "1 process, 1 thread" \
        "$PYTHON" -m kdcache "${DUMP[@]}" --out "$OUT/one-thread.zarr"
    OMP_NUM_THREADS=$(( CORES / RANKS > 0 ? CORES / RANKS : 1 )) timed \
        "$RANKS ranks, $(( CORES / RANKS > 0 ? CORES / RANKS : 1 )) thread(s) each" \
        "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$RANKS" \
        -m kdcache "${DUMP[@]}" --out "$OUT/ranks.zarr"
done
