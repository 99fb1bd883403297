#!/usr/bin/env bash
# Reproduces every number and figure of docs/results.md on the digits dataset (CPU, no downloads).
# Usage: pipelines/digits_results.sh [OUT]   (run from the repository root; OUT defaults to results-digits)
set -euo pipefail
OUT=${1:-results-digits}
PYTHON=${PYTHON:-python}
kdcache() { "$PYTHON" -m kdcache -q "$@"; }

# Teachers: a cnn trained with cross-entropy, 3 seeds; seed 0 is the one whose logits are cached.
for seed in 0 1 2; do
  kdcache train --model cnn --dataset digits --epochs 15 --seed "$seed" --device cpu --out "$OUT/teacher-seed$seed"
done
kdcache dump-teacher --teacher cnn --weights "$OUT/teacher-seed0/best.pt" --dataset digits --device cpu --out "$OUT/teacher.zarr"

# CE-only students: the baseline every distilled student has to beat (the student and lr of the
# former quickstart; pipelines/quickstart.sh now uses mlp:128 and a 30-epoch teacher).
for seed in 0 1 2; do
  kdcache train --model mlp:32 --dataset digits --epochs 20 --lr 3e-3 --seed "$seed" --device cpu --out "$OUT/ce-seed$seed"
done

# Distilled students from the one cache: 3 losses x 5 temperatures x (alpha 0.7, alpha 1 = Hinton's soft
# targets only) x 3 seeds. The teacher never runs here.
kdcache sweep --cache "$OUT/teacher.zarr" --student mlp:32 --losses kd,focal,attention \
  --temperatures 1,2,4,8,16 --alphas 0.7,1 --seeds 0,1,2 --epochs 20 --lr 3e-3 --device cpu --out "$OUT/sweep"

# Teacher and CE rows of the report: mean ± std over the 3 seeds of each run's best and final accuracy.
"$PYTHON" - "$OUT" <<'PY'
import json, pathlib, statistics, sys

out = pathlib.Path(sys.argv[1])
for name in ("teacher", "ce"):
    runs = [[json.loads(line) for line in (out / f"{name}-seed{seed}" / "metrics.jsonl").read_text().splitlines()]
            for seed in range(3)]
    best = [max(record["val_acc"] for record in run) for run in runs]
    final = [run[-1]["val_acc"] for run in runs]
    print(f"{name:8s} best {statistics.mean(best):.2f} ± {statistics.stdev(best):.2f}  "
          f"final {statistics.mean(final):.2f} ± {statistics.stdev(final):.2f}")
PY

# Top-k: the same teacher stored as its 3 largest logits per sample (topk:3), then kd and the
# seed's top-k attention loss (restricted to those 3 classes) at three temperatures.
kdcache dump-teacher --teacher cnn --weights "$OUT/teacher-seed0/best.pt" --dataset digits --device cpu \
  --encoding topk:3 --out "$OUT/teacher-top3.zarr"
kdcache sweep --cache "$OUT/teacher-top3.zarr" --student mlp:32 --losses kd,attention --top-k 3 \
  --temperatures 1,4,16 --alphas 0.7 --seeds 0,1,2 --epochs 20 --lr 3e-3 --device cpu --out "$OUT/sweep-top3"
kdcache inspect "$OUT/teacher.zarr" --plot "$OUT/teacher-store.png"
