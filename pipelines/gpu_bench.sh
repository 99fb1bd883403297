#!/usr/bin/env bash
# GPU figures for docs/benchmarks.md: the input path, `kdcache bench dump` and `kdcache bench distill`
# with a ResNet-50 teacher and a ResNet-18 student at 224 px, bf16 autocast, channels-last, uint8
# batches normalised on the GPU; then the same on an image folder of JPEGs decoded on the GPU.
#
# Run from the repository root on a CUDA machine where kdcache's dependencies are installed:
#     OUT=/path/to/results bash pipelines/gpu_bench.sh
# Writes into $OUT: device.txt, bench_inputs_gpu.json (float32 vs uint8 loader), bench_dump_gpu.json,
# bench_distill_gpu.json, bench_inputs_jpeg_gpu.json (PIL in workers vs nvJPEG) and
# bench_distill_jpeg_gpu.json. About 5 minutes on one H200 with 16 cores; each step is capped and a
# failed step does not stop the others (the script exits non-zero at the end if any failed).
# Overrides: PYTHON (interpreter), N (synthetic samples), JPEG_N (JPEG training images), BATCH (256),
# WORKERS (DataLoader workers), DEVICE (cuda), AMP (bf16; "" for float32), SPEED (extra options,
# default --channels-last), TEACHER (resnet50), STUDENT (resnet18), SIZE (224, synthetic images),
# JPEGS (folder for the JPEGs, default a temporary folder, deleted at the end).
# A CPU smoke test of the whole script (tiny models and data, about 2 minutes on 2 cores):
#     DEVICE=cpu N=64 JPEG_N=32 BATCH=16 WORKERS=1 TEACHER=cnn:8 STUDENT=mlp:16 SIZE=32 \
#         bash pipelines/gpu_bench.sh
set -uo pipefail

OUT=${OUT:-gpu-bench-out}
PYTHON=${PYTHON:-python3}
N=${N:-16384}
JPEG_N=${JPEG_N:-4096}
BATCH=${BATCH:-256}
DEVICE=${DEVICE:-cuda}
AMP=${AMP-bf16}
SPEED=${SPEED:---channels-last}
WORKERS=${WORKERS:-$(( $(nproc) > 3 ? $(nproc) - 2 : 1 ))}
TEACHER=${TEACHER:-resnet50}
STUDENT=${STUDENT:-resnet18}
SIZE=${SIZE:-224}
if [ -z "${JPEGS:-}" ]; then
    scratch=$(mktemp -d)
    trap 'rm -rf "$scratch"' EXIT
    JPEGS=$scratch/jpegs
fi
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
failed=0
step() {  # step NAME SECONDS OUTFILE COMMAND...: run one capped step, keep going on failure
    local name=$1 seconds=$2 out=$3; shift 3
    local started=$SECONDS
    if timeout "$seconds" "$@" > "$out"; then
        echo "gpu_bench.sh: $name done in $(( SECONDS - started )) s" >&2
    else
        echo "gpu_bench.sh: $name FAILED (status $?, after $(( SECONDS - started )) s)" >&2
        failed=1
    fi
}

"$PYTHON" - "$DEVICE" <<'PY' | tee "$OUT/device.txt"
import sys, torch, torchvision
device = sys.argv[1]
if device.startswith("cuda") and not torch.cuda.is_available():
    sys.exit("gpu_bench.sh: CUDA is not available to this python; install a CUDA build of torch")
name = torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu"
print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, device {name}")
PY

amp=(${AMP:+--amp "$AMP"})
speed=(--batch-size "$BATCH" --num-workers "$WORKERS" --device "$DEVICE" "${amp[@]}" $SPEED --json)
synthetic="synthetic:$N:$SIZE:1000"
kd=(-m kdcache -q bench distill --student "$STUDENT" --teacher "$TEACHER")

step "inputs (synthetic)" 75 "$OUT/bench_inputs_gpu.json" "$PYTHON" -m kdcache -q bench inputs \
    --dataset "$synthetic" --forms float32,uint8 --repeats 2 --batch-size "$BATCH" \
    --num-workers "$WORKERS" --device "$DEVICE" --json
step "dump" 90 "$OUT/bench_dump_gpu.json" "$PYTHON" -m kdcache -q bench dump --teacher "$TEACHER" \
    --dataset "$synthetic" --inputs uint8 --repeats 3 "${speed[@]}"
step "distill" 170 "$OUT/bench_distill_gpu.json" "$PYTHON" "${kd[@]}" \
    --dataset "$synthetic" --inputs uint8 --repeats 3 "${speed[@]}"

step "make JPEGs" 60 /dev/stderr "$PYTHON" pipelines/make_jpegs.py "$JPEGS" --train "$JPEG_N" \
    --val $(( JPEG_N / 8 )) --classes $(( JPEG_N / 8 < 100 ? JPEG_N / 8 : 100 ))
step "inputs (JPEG)" 90 "$OUT/bench_inputs_jpeg_gpu.json" "$PYTHON" -m kdcache -q bench inputs \
    --dataset "imagefolder:$JPEGS" --forms uint8,jpeg --repeats 2 --batch-size "$BATCH" \
    --num-workers "$WORKERS" --device "$DEVICE" --json
step "distill (JPEG)" 150 "$OUT/bench_distill_jpeg_gpu.json" "$PYTHON" "${kd[@]}" \
    --dataset "imagefolder:$JPEGS" --inputs jpeg --repeats 2 "${speed[@]}"

"$PYTHON" - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
def load(name):
    path = out / name
    return json.loads(path.read_text()) if path.is_file() and path.stat().st_size else None
for name in ("bench_inputs_gpu.json", "bench_inputs_jpeg_gpu.json"):
    if (r := load(name)):
        for form, f in r["forms"].items():
            print(f"{name}: {form:8s} {f['samples_per_s']:>10,.0f} samples/s  {f['bytes_per_batch']:>12,} B/batch")
if (r := load("bench_dump_gpu.json")):
    print(f"dump: loop / bare = {r['dump_loop_over_bare']:.3f} (bare {r['bare_forward_samples_per_s']:,.0f}/s, dump {r['dump_loop_samples_per_s']:,.0f}/s)")
for name in ("bench_distill_gpu.json", "bench_distill_jpeg_gpu.json"):
    if (r := load(name)):
        print(f"{name}: ce {r['ce_samples_per_s']:,.0f}/s cache {r['cache_samples_per_s']:,.0f}/s online {r['online_samples_per_s']:,.0f}/s "
              f"loader {r['loader_only_samples_per_s']:,.0f}/s; CE/cache throughput {1 / r['cache_over_ce']:.3f}; "
              f"online/cache {r['online_over_cache']:.3f} of saving {r['compute_only_saving']:.3f} = {r['saving_fraction']:.3f} "
              f"(share of the teacher's time saved {r['saved_time_fraction']:.3f})")
PY
exit $failed
