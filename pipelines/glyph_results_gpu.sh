#!/usr/bin/env bash
# The 1,000-class results of docs/results.md at a larger setting, on a CUDA machine: the CPU
# setting (glyph_results.py's defaults) scaled up. 32 x 32 glyphs; a resnet:64 teacher trained 15
# epochs on 100 images per class (100,000 images); resnet:16 students (16x fewer multiply-adds)
# on the first 20 images per class, 20 epochs, so that they are data-starved as on the CPU; then
# the bytes-per-view curve on that teacher's logits.
#
# Run from the repository root where kdcache's dependencies are installed:
#     OUT=/path/to/results bash pipelines/glyph_results_gpu.sh
# Writes $OUT/results (glyph_results.json and .md, the teacher, the stores and runs) and
# $OUT/bytes (results.json, tables.md) and $OUT/glyphs-view-bytes.png. Every run goes to the GPU
# (--device cuda); the tasks share it, JOBS at a time, 4 CPU threads each.
# Overrides: PYTHON, DATASET (the teacher's: glyphs:1000:32:100), STUDENT_DATASET (the students'
# and the stores': glyphs:1000:32:20), TEACHER (resnet:64), TEACHER_EPOCHS (15), STUDENT
# (resnet:16), EPOCHS (20), SEEDS (0,1,2), JOBS (4), PARTS (encodings,sweep,views) and RECIPE
# (glyph_results.py's rrc+flip).
set -euo pipefail

OUT=${OUT:-glyph-results-gpu}
PYTHON=${PYTHON:-python3}
DATASET=${DATASET:-glyphs:1000:32:100}
TEACHER=${TEACHER:-resnet:64}
TEACHER_EPOCHS=${TEACHER_EPOCHS:-15}
STUDENT=${STUDENT:-resnet:16}
EPOCHS=${EPOCHS:-20}
SEEDS=${SEEDS:-0,1,2}
JOBS=${JOBS:-4}
PARTS=${PARTS:-encodings,sweep,views}
STUDENT_DATASET=${STUDENT_DATASET:-glyphs:1000:32:20}
recipe=()
if [[ -n ${RECIPE:-} ]]; then recipe=(--recipe "$RECIPE"); fi
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-.}
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/device.txt" || true

"$PYTHON" pipelines/glyph_results.py "$OUT/results" --dataset "$STUDENT_DATASET" \
    --teacher-dataset "$DATASET" --teacher "$TEACHER" --teacher-epochs "$TEACHER_EPOCHS" \
    --student "$STUDENT" --epochs "$EPOCHS" --seeds "$SEEDS" --jobs "$JOBS" --parts "$PARTS" \
    "${recipe[@]}" --device cuda --threads 4
"$PYTHON" pipelines/glyph_view_bytes.py --weights "$OUT/results/teacher/best.pt" \
    --teacher "$TEACHER" --dataset "${DATASET%:*}:4" --out "$OUT/bytes" \
    --figure "$OUT/glyphs-view-bytes.png"
