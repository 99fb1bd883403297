#!/usr/bin/env bash
# GPU figures for docs/benchmarks.md (language models): `kdcache bench lm` with a Llama-style teacher
# of about 1.5 B parameters built from a config (random weights: speed does not depend on them), a
# 128,000-token vocabulary (byte-level BPE trained here on the standard library's own source, padded
# with reserved tokens to 128k), bf16 autocast, sequences of 1,024 tokens. The random weights are
# drawn once on DEVICE and saved as safetensors (teacher in AMP's dtype, as a released checkpoint
# is; student float32, the masters it trains): the benchmark loads the teacher 2 x REPEATS + 1
# times per encoding, and drawing 1.5 B numbers on the host each time takes longer than the runs
# it times.
# Measures, side by side in one run: the dump's tokens/s against the bare teacher forward, the token
# feed's tokens/s, and an epoch distilled from the cache against CE-only and online distillation.
#
# Run from the repository root on a CUDA machine where kdcache and its [llm] extra are installed:
#     OUT=/path/to/results bash pipelines/gpu_lm_bench.sh
# Writes into $OUT: device.txt, models.txt (parameter counts), bench_lm_gpu_<encoding>.json for
# each encoding in ENCODINGS. Run once, at VOCAB=64000 and topk:32 only (docs/benchmarks.md,
# "Second GPU pass"); sampled:16 has since been drawn on the device too and was never run on a GPU.
# Each step is capped at STEP_S seconds and a failed step does not stop the others (the script
# exits non-zero at the end if any failed).
# Overrides: PYTHON, DEVICE (cuda), AMP (bf16; "" for float32), VOCAB (128000), LAYERS (16),
# HIDDEN (2048), FFN (8192), HEADS (16), KV_HEADS (8), STUDENT_LAYERS (4), STUDENT_HIDDEN (1024),
# MAX_LEN (1024), EVERY (keep every EVERY-th stdlib document, 200: about 50k tokens), BATCH (8
# sequences), EPOCHS (2), REPEATS (3), ENCODINGS ("topk:32 sampled:16"), STEP_S (540).
# The BPE is trained on every document although fewer would train faster: the fewer tokens it
# learns, the more reserved ones fill the 128k, and loading a tokenizer grows with those (5.3 s
# with 5,000 and 74 s with 50,000, on 2 busy cores), which every one of the benchmark's model
# loads pays.
# A CPU smoke test of the whole script (tiny models and text, about 3 minutes on 2 cores):
#     DEVICE=cpu AMP= VOCAB=2000 LAYERS=1 HIDDEN=64 FFN=128 HEADS=2 KV_HEADS=1 STUDENT_LAYERS=1 \
#         STUDENT_HIDDEN=32 MAX_LEN=64 EVERY=400 BATCH=4 EPOCHS=1 REPEATS=1 ENCODINGS=topk:8 \
#         OUT=/tmp/gpu-lm-smoke bash pipelines/gpu_lm_bench.sh
set -uo pipefail

OUT=${OUT:-gpu-lm-bench-out}
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
AMP=${AMP-bf16}
VOCAB=${VOCAB:-128000}
LAYERS=${LAYERS:-16}
HIDDEN=${HIDDEN:-2048}
FFN=${FFN:-8192}
HEADS=${HEADS:-16}
KV_HEADS=${KV_HEADS:-8}
STUDENT_LAYERS=${STUDENT_LAYERS:-4}
STUDENT_HIDDEN=${STUDENT_HIDDEN:-1024}
MAX_LEN=${MAX_LEN:-1024}
EVERY=${EVERY:-200}
BATCH=${BATCH:-8}
EPOCHS=${EPOCHS:-2}
REPEATS=${REPEATS:-3}
ENCODINGS=${ENCODINGS:-topk:32 sampled:16}
STEP_S=${STEP_S:-540}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
failed=0
step() {  # step NAME SECONDS OUTFILE COMMAND...: run one capped step, keep going on failure
    local name=$1 seconds=$2 out=$3; shift 3
    local started=$SECONDS
    if timeout "$seconds" "$@" > "$out"; then
        echo "gpu_lm_bench.sh: $name done in $(( SECONDS - started )) s" >&2
    else
        echo "gpu_lm_bench.sh: $name FAILED (status $?, after $(( SECONDS - started )) s)" >&2
        failed=1
    fi
}

"$PYTHON" - "$DEVICE" <<'PY' | tee "$OUT/device.txt"
import sys, torch, transformers
device = sys.argv[1]
if device.startswith("cuda") and not torch.cuda.is_available():
    sys.exit("gpu_lm_bench.sh: CUDA is not available to this python; install a CUDA build of torch")
name = torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu"
print(f"torch {torch.__version__}, transformers {transformers.__version__}, device {name}")
PY

# The text, the tokenizer, the two configs and their random weights.
"$PYTHON" - "$OUT" "$DEVICE" "$AMP" "$VOCAB" "$LAYERS" "$HIDDEN" "$FFN" "$HEADS" "$KV_HEADS" \
    "$STUDENT_LAYERS" "$STUDENT_HIDDEN" "$MAX_LEN" "$EVERY" <<'PY' | tee "$OUT/models.txt"
import json, sys, time
from pathlib import Path
sys.path.insert(0, "pipelines")
import torch
from lm_stdlib import stdlib_documents, train_tokenizer
from transformers import AutoModelForCausalLM, LlamaConfig

out, device, amp = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
vocab, layers, hidden, ffn, heads, kv, s_layers, s_hidden, max_len, every = map(int, sys.argv[4:])
started = time.perf_counter()
documents = stdlib_documents(4 * max_len)
with (out / "text.jsonl").open("w") as stream:
    for text in documents[::every]:
        stream.write(json.dumps({"text": text}) + "\n")
tokenizer, learned = train_tokenizer(documents, vocab)
print(f"text and tokenizer: {time.perf_counter() - started:.1f} s")


def write(folder, dtype, layers, hidden, ffn, heads, kv):
    started = time.perf_counter()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=ffn,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
        max_position_embeddings=max_len, tie_word_embeddings=False,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    with torch.device(device):  # drawn where it runs: seconds on a GPU, minutes on the host
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(out / folder)
    tokenizer.save_pretrained(out / folder)
    params = sum(p.numel() for p in model.parameters())
    print(f"{folder}: {params / 1e6:,.1f} M parameters ({dtype}), vocabulary {len(tokenizer)} "
          f"({learned} learned BPE tokens), {layers} layers x {hidden}; drawn and saved in "
          f"{time.perf_counter() - started:.1f} s")


teacher_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp, torch.float32)
write("teacher", teacher_dtype, layers, hidden, ffn, heads, kv)
write("student", torch.float32, s_layers, s_hidden, 4 * s_hidden, max(1, s_hidden // 128),
      max(1, s_hidden // 256))
PY

amp_option=()
if [ -n "$AMP" ]; then amp_option=(--amp "$AMP"); fi
for encoding in $ENCODINGS; do
    step "bench lm $encoding" "$STEP_S" "$OUT/bench_lm_gpu_${encoding/:/}.json" \
        "$PYTHON" -m kdcache bench lm --teacher "hf:$OUT/teacher" --student "hf:$OUT/student" \
        --dataset "text:$OUT/text.jsonl:$MAX_LEN" --encoding "$encoding" --batch-size "$BATCH" \
        --epochs "$EPOCHS" --repeats "$REPEATS" --device "$DEVICE" "${amp_option[@]}" --json
done
exit $failed
