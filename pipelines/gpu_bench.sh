#!/usr/bin/env bash
# GPU figures for docs/benchmarks.md: `kdcache bench dump` and `kdcache bench distill` with a
# ResNet-50 teacher and a ResNet-18 student at 224 px on synthetic data (synthetic:N:224:1000).
#
# Run from the repository root on a CUDA machine where kdcache's dependencies are installed:
#     OUT=/path/to/results bash pipelines/gpu_bench.sh
# Writes $OUT/device.txt, $OUT/bench_dump_gpu.json and $OUT/bench_distill_gpu.json.
# About 3-4 minutes on one H200 with 16 cores (each run also builds fake data's labels, ~1 ms
# per 224 px image on one core); each step is capped so the whole stays under 6 minutes.
# Overrides: PYTHON (interpreter), N (samples), BATCH (256), WORKERS (DataLoader workers),
# DEVICE (cuda); e.g. a CPU smoke test: DEVICE=cpu N=8 BATCH=4 bash pipelines/gpu_bench.sh
set -euo pipefail

OUT=${OUT:-gpu-bench-out}
PYTHON=${PYTHON:-python3}
N=${N:-8000}
BATCH=${BATCH:-256}
DEVICE=${DEVICE:-cuda}
WORKERS=${WORKERS:-$(( $(nproc) > 3 ? $(nproc) - 2 : 1 ))}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

"$PYTHON" - "$DEVICE" <<'PY' | tee "$OUT/device.txt"
import sys, torch
device = sys.argv[1]
if device.startswith("cuda") and not torch.cuda.is_available():
    sys.exit("gpu_bench.sh: CUDA is not available to this python; install a CUDA build of torch")
name = torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu"
print(f"torch {torch.__version__}, device {name}")
PY

common=(--dataset "synthetic:$N:224:1000" --batch-size "$BATCH" --num-workers "$WORKERS" --device "$DEVICE" --json)
timeout 120 "$PYTHON" -m kdcache -q bench dump --teacher resnet50 --repeats 2 "${common[@]}" \
    > "$OUT/bench_dump_gpu.json"
timeout 220 "$PYTHON" -m kdcache -q bench distill --student resnet18 --teacher resnet50 --repeats 3 "${common[@]}" \
    > "$OUT/bench_distill_gpu.json"
echo "wrote $OUT/bench_dump_gpu.json and $OUT/bench_distill_gpu.json"
