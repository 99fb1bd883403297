#!/usr/bin/env bash
# The language-model example, with nothing downloaded: build a byte-level BPE tokenizer and GPT-2
# configs from the standard library's pydoc_data.topics text, train a small teacher LM, cache its
# next-token distributions once (sampled:48: 48 unbiased draws per token, ~55 B/token; top-k
# stores spread the tail uniformly and distil worse here, see docs/results.md), distill a smaller
# student from the store, train the same student with cross-entropy only, and compare held-out
# perplexities.
# Needs the [llm] extra (pip install -e ".[llm]").
# Usage: bash pipelines/lm_quickstart.sh [OUT_DIR]   (default runs/lm_quickstart; SEED=1 to change
# the seed; TEACHER_EPOCHS / STUDENT_EPOCHS to shorten or lengthen the runs)
set -euo pipefail

out=${1:-runs/lm_quickstart}
seed=${SEED:-0}
teacher_epochs=${TEACHER_EPOCHS:-5}
student_epochs=${STUDENT_EPOCHS:-2}
data="text:$out/topics.jsonl:128"
mkdir -p "$out"

now() { python3 -c 'import time; print(time.time())'; }
stage() {  # stage NAME COMMAND...: run one kdcache command, remember its wall time
  local name=$1; shift
  echo "== $name: kdcache $*" >&2
  local start; start=$(now)
  kdcache -q "$@" >&2
  echo "$name $(python3 -c "import time; print(f'{time.time() - $start:.1f}')")" >> "$out/times.txt"
}

rm -f "$out/times.txt"
python3 "$(dirname "$0")/lm_setup.py" "$out" --vocab 1024 --teacher 2x128 --student 2x64 >&2
stage teacher train --model "hf:$out/teacher-init" --dataset "$data" --epochs "$teacher_epochs" \
  --batch-size 16 --lr 2e-3 --seed "$seed" --out "$out/teacher" --overwrite
stage dump dump-teacher --teacher "hf:$out/teacher/best" --dataset "$data" --encoding sampled:48 \
  --batch-size 64 --out "$out/teacher.zarr" --overwrite
stage kd_student distill --student "hf:$out/student-init" --cache "$out/teacher.zarr" \
  --temperature 1 --alpha 0.5 --epochs "$student_epochs" --batch-size 16 --lr 2e-3 \
  --seed "$seed" --out "$out/kd_student" --overwrite
stage ce_student train --model "hf:$out/student-init" --dataset "$data" --epochs "$student_epochs" \
  --batch-size 16 --lr 2e-3 --seed "$seed" --out "$out/ce_student" --overwrite

python3 - "$out" <<'PY'
import json, pathlib, sys

out = pathlib.Path(sys.argv[1])
times = dict(line.split() for line in (out / "times.txt").read_text().splitlines())
def final_ppl(run):
    return json.loads((out / run / "metrics.jsonl").read_text().splitlines()[-1])["val_ppl"]
store = out / "teacher.zarr"
size = sum(p.stat().st_size for p in store.rglob("*") if p.is_file())
tokens = json.loads((store / "zarr.json").read_text())["attributes"]["kdcache"]["num_samples"]
rows = [
    ("teacher GPT-2 2x128, CE", f"ppl {final_ppl('teacher'):.2f}", times["teacher"]),
    ("dump sampled:48", f"{size:,} B, {size / tokens:.1f} B/token", times["dump"]),
    ("student GPT-2 2x64, KD from cache", f"ppl {final_ppl('kd_student'):.2f}", times["kd_student"]),
    ("student GPT-2 2x64, CE only", f"ppl {final_ppl('ce_student'):.2f}", times["ce_student"]),
]
print(f"{'stage':<36} {'held-out result':<28} {'wall s':>7}")
for name, result, seconds in rows:
    print(f"{name:<36} {result:<28} {seconds:>7}")
PY
