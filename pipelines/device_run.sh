#!/usr/bin/env bash
# One pass of GPU figures for docs/benchmarks.md, sized to end within TOTAL_S (470 s) on one H200
# with 16 cores: the image dump (ResNet-50, 224 px, bf16, channels-last) with 16 augmented views and
# with one, the store writer alone at C = 1,000 against its threads, ResNet-18 distilled from the
# cache vs online, then pipelines/gpu_lm_bench.sh (1.5 B Llama-style teacher, V = 128k) in what time
# is left. The image steps run first: their times are known from earlier GPU runs, the LM's are not.
#
# On the device machine (the device tool's `run`), from the repository root, with the wheels of zarr
# and its dependencies (absent from that image) in .whl:
#     command: bash pipelines/device_run.sh        carry: [".whl"]        timeout_s: 540
# The wheels (about 9.7 MiB; .whl is in .gitignore), fetched once here:
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#         --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#         --platform manylinux2014_x86_64 -d .whl zarr==3.1.6 numcodecs==0.16.6 donfig google-crc32c
# (their other needs, numpy, packaging, typing-extensions and pyyaml, are on that image).
#
# Writes into $OUT (at most 8 files): results.txt (machine, versions, every step's log and a
# summary), dump_views16.json, dump_plain.json, writer.json, distill.json, lm_topk32.json and
# lm_sampled16.json (one per LM encoding). Every step is capped with `timeout`; a failed step does
# not stop the others and the script exits non-zero at the end if any failed.
# Overrides: PYTHON, DEVICE (cuda), AMP (bf16; "" for float32), TOTAL_S (470), TEACHER (resnet50),
# STUDENT (resnet18), SIZE (224), IMG_BATCH (256), WORKERS (6: better than 14 in the 2026-11-28
# run), VIEWS_WORKERS (10: the views are cut from float32 images in the workers), VIEWS (16),
# RECIPE (rrc:scale=0.35-1+flip), VIEWS_N (1024 samples), DUMP_N (16384), DISTILL_N (8192),
# WRITER_ROWS (65536), WRITER_WORKERS (1,2,4,8), IMG_REPEATS (3), DISTILL_REPEATS (2), CAP_SCALE
# (1: multiplies each step's cap, for slow machines). The LM step takes gpu_lm_bench.sh's own
# variables, with EVERY (200: ~55k tokens), REPEATS (2) and ENCODINGS ("topk:32 sampled:16";
# "" skips the LM) defaulted here.
# A CPU smoke test of the whole script (tiny models and data; minutes on 2 cores, but over 15 on
# 2 cores at a load of 13, where importing torch alone took a minute):
#     DEVICE=cpu AMP= TEACHER=cnn:8 STUDENT=mlp:16 SIZE=32 IMG_BATCH=16 WORKERS=1 VIEWS_WORKERS=1 \
#         VIEWS_N=16 DUMP_N=64 DISTILL_N=64 WRITER_ROWS=2048 WRITER_WORKERS=1,2 IMG_REPEATS=1 \
#         DISTILL_REPEATS=1 VOCAB=2000 LAYERS=1 HIDDEN=64 FFN=128 HEADS=2 KV_HEADS=1 \
#         STUDENT_LAYERS=1 STUDENT_HIDDEN=32 MAX_LEN=64 EVERY=400 BATCH=4 \
#         EPOCHS=1 REPEATS=1 ENCODINGS=topk:8 CAP_SCALE=8 TOTAL_S=3000 \
#         OUT=/tmp/device-run-smoke bash pipelines/device_run.sh
set -uo pipefail

OUT=${OUT:-device-run-out}
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
AMP=${AMP-bf16}
TOTAL_S=${TOTAL_S:-470}
TEACHER=${TEACHER:-resnet50}
STUDENT=${STUDENT:-resnet18}
SIZE=${SIZE:-224}
IMG_BATCH=${IMG_BATCH:-256}
WORKERS=${WORKERS:-6}
VIEWS_WORKERS=${VIEWS_WORKERS:-10}
VIEWS=${VIEWS:-16}
RECIPE=${RECIPE:-rrc:scale=0.35-1+flip}
VIEWS_N=${VIEWS_N:-1024}
DUMP_N=${DUMP_N:-16384}
DISTILL_N=${DISTILL_N:-8192}
WRITER_ROWS=${WRITER_ROWS:-65536}
WRITER_WORKERS=${WRITER_WORKERS:-1,2,4,8}
IMG_REPEATS=${IMG_REPEATS:-3}
DISTILL_REPEATS=${DISTILL_REPEATS:-2}
CAP_SCALE=${CAP_SCALE:-1}
export EVERY=${EVERY:-200} REPEATS=${REPEATS:-2}
export ENCODINGS=${ENCODINGS-topk:32 sampled:16}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
LOG=$OUT/results.txt
: > "$LOG"
failed=0
note() { echo "device_run.sh [$(( SECONDS ))s]: $*" | tee -a "$LOG" >&2; }
# step NAME SECONDS OUTFILE COMMAND...: capped at CAP_SCALE x SECONDS and at what TOTAL_S leaves
step() {
    local name=$1 seconds=$(( $2 * CAP_SCALE )) out=$3; shift 3
    local left=$(( TOTAL_S - SECONDS - 5 ))
    if (( seconds > left )); then seconds=$left; fi
    if (( seconds < 10 )); then note "$name SKIPPED (only ${left} s left)"; failed=1; return; fi
    local started=$SECONDS
    if timeout -k 10 "$seconds" "$@" > "$out" 2>> "$LOG"; then
        note "$name done in $(( SECONDS - started )) s (cap ${seconds} s)"
    else
        note "$name FAILED (status $?, after $(( SECONDS - started )) s, cap ${seconds} s)"
        failed=1
    fi
}

# zarr and numcodecs are not on the device's image: install the carried wheels beside it.
if "$PYTHON" -c "import zarr, numcodecs" 2>/dev/null; then
    note "zarr importable: wheels not installed"
elif ls .whl/*.whl > /dev/null 2>&1; then
    if timeout 60 "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target /tmp/site .whl/*.whl >> "$LOG" 2>&1; then
        note "wheels installed: $(cd .whl && echo *.whl)"
    else
        note "wheel install FAILED (pip's output is above)"
        failed=1
    fi
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
else
    note "zarr is missing and there are no wheels in .whl (carry .whl)"
    failed=1
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

{
    date -u
    uname -a
    nproc
    free -g
    timeout 20 nvidia-smi || echo "no nvidia-smi"
    echo "settings: DEVICE=$DEVICE AMP=$AMP TOTAL_S=$TOTAL_S TEACHER=$TEACHER STUDENT=$STUDENT" \
        "SIZE=$SIZE IMG_BATCH=$IMG_BATCH WORKERS=$WORKERS VIEWS_WORKERS=$VIEWS_WORKERS" \
        "VIEWS=$VIEWS RECIPE=$RECIPE VIEWS_N=$VIEWS_N DUMP_N=$DUMP_N DISTILL_N=$DISTILL_N" \
        "WRITER_ROWS=$WRITER_ROWS WRITER_WORKERS=$WRITER_WORKERS IMG_REPEATS=$IMG_REPEATS" \
        "DISTILL_REPEATS=$DISTILL_REPEATS EVERY=$EVERY REPEATS=$REPEATS ENCODINGS=$ENCODINGS"
    timeout 60 "$PYTHON" -c 'import sys, torch, torchvision, transformers, tokenizers, zarr, numcodecs, numpy
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "torchvision", torchvision.__version__, "transformers", transformers.__version__,
      "tokenizers", tokenizers.__version__, "zarr", zarr.__version__, "numcodecs",
      numcodecs.__version__, "numpy", numpy.__version__)
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")'
} >> "$LOG" 2>&1

amp=(${AMP:+--amp "$AMP"})
speed=(--batch-size "$IMG_BATCH" --device "$DEVICE" "${amp[@]}" --channels-last --json)
dump=("$PYTHON" -m kdcache -q bench dump --teacher "$TEACHER")

step "dump, $VIEWS views" 75 "$OUT/dump_views$VIEWS.json" "${dump[@]}" \
    --dataset "synthetic:$VIEWS_N:$SIZE:1000" --views "$VIEWS" --augment "$RECIPE" \
    --encoding topk:5 --num-workers "$VIEWS_WORKERS" --repeats "$IMG_REPEATS" "${speed[@]}"
step "dump, one view" 60 "$OUT/dump_plain.json" "${dump[@]}" \
    --dataset "synthetic:$DUMP_N:$SIZE:1000" --inputs uint8 --num-workers "$WORKERS" \
    --repeats "$IMG_REPEATS" "${speed[@]}"
# Two rounds: each of the 8 runs creates a store sized for 20,480,000 rows (1.28M images x 16
# views), whose setup cost 1.6x the CPU of a 1,024-row store's in a CPU test.
step "writer alone" 60 "$OUT/writer.json" "$PYTHON" -m kdcache -q bench dump --writer-only \
    --encoding float16,topk:5 --writer-workers "$WRITER_WORKERS" \
    --rows "$WRITER_ROWS" --store-rows 20480000 --repeats 2 --json
step "distill" 90 "$OUT/distill.json" "$PYTHON" -m kdcache -q bench distill --student "$STUDENT" \
    --teacher "$TEACHER" --dataset "synthetic:$DISTILL_N:$SIZE:1000" --epochs 2 --inputs uint8 \
    --num-workers "$WORKERS" --repeats "$DISTILL_REPEATS" "${speed[@]}"

# The LM benchmark gets what is left: its setup (stdlib text, tokenizer, weights) then an equal
# share per encoding (ENCODINGS="" skips it).
set -- $ENCODINGS
lm_total=$(( TOTAL_S - SECONDS - 10 ))
if (( $# > 0 && lm_total < 100 )); then
    note "LM SKIPPED (only ${lm_total} s left)"
    failed=1
elif (( $# > 0 )); then
    lm=$(mktemp -d)
    export STEP_S=${STEP_S:-$(( (lm_total - 45) / $# ))}
    note "LM: ${lm_total} s left, ${STEP_S} s per encoding"
    step "LM (gpu_lm_bench.sh)" "$lm_total" "$lm/stdout.txt" env OUT="$lm" DEVICE="$DEVICE" \
        AMP="$AMP" PYTHON="$PYTHON" bash pipelines/gpu_lm_bench.sh
    cat "$lm/device.txt" "$lm/models.txt" >> "$LOG" 2>&1
    for encoding in $ENCODINGS; do
        cp "$lm/bench_lm_gpu_${encoding/:/}.json" "$OUT/lm_${encoding/:/}.json" 2>> "$LOG"
    done
    rm -rf "$lm"
fi

{
    echo "== summary"
    timeout 20 nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv
    timeout 60 "$PYTHON" - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
def load(name):
    path = out / name
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
for name in sorted(out.glob("dump_*.json")):
    if (r := load(name.name)):
        print(f"{name.name}: throughput dump / bare {1 / r['dump_loop_over_bare']:.3f} "
              f"(bare {r['bare_forward_views_per_s']:,.0f} views/s, dump "
              f"{r['dump_loop_views_per_s']:,.0f} views/s, fsync cost {r['fsync_cost']:.3f}, "
              f"views {r['views']}, encoding {r['encoding']}, writer threads {r['writer_workers']})")
if (r := load("writer.json")):
    for run in r["runs"]:
        print(f"writer.json: {run['encoding']:8s} {run['workers']} threads {run['rows_per_s']:>10,.0f} "
              f"rows/s ({run['rows_per_cpu_s']:,.0f} rows/cpu-s, speed-up {run['speedup']:.2f})")
if (r := load("distill.json")):
    print(f"distill.json: ce {r['ce_samples_per_s']:,.0f}/s cache {r['cache_samples_per_s']:,.0f}/s "
          f"online {r['online_samples_per_s']:,.0f}/s; cache/ce {r['cache_over_ce']:.3f}; "
          f"online/cache {r['online_over_cache']:.3f} of compute-only saving "
          f"{r['compute_only_saving']:.3f}")
for name in sorted(out.glob("lm_*.json")):
    if (r := load(name.name)):
        print(f"{name.name}: {r['num_tokens']:,} tokens, dump/bare {r['dump_over_bare_throughput']:.3f} "
              f"(bare {r['bare_forward_tokens_per_s']:,.0f} tok/s, dump {r['dump_loop_tokens_per_s']:,.0f}), "
              f"feed {r['feed_tokens_per_s']:,.0f} tok/s; epoch s ce {r['ce_epoch_s']} cache "
              f"{r['cache_epoch_s']} online {r['online_epoch_s']}; online/cache {r['online_over_cache']:.3f}")
PY
    echo "device_run.sh: finished in ${SECONDS} s, failed=$failed"
} >> "$LOG" 2>&1
exit $failed
