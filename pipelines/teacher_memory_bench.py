"""Peak memory of a language-model dump against the size of the teacher's weights, per checkpoint
dtype (float32 and bfloat16), on the CPU.

    PYTHONPATH=. python pipelines/teacher_memory_bench.py [--layers 8] [--width 768]

It saves one GPT-2 (a word-level tokenizer of 32,000 tokens, ``--layers`` x ``--width``, random
weights) twice, in float32 and in bfloat16, and dumps each over the same synthetic text with
``topk:32`` (batches of 2 sequences of 64 tokens, so that the weights dominate) in a fresh
process. A process reports its resident set just before the dump (torch, transformers and
kdcache imported) and the peak of its resident set during the dump, with the peak reset at the
start (``/proc/self/clear_refs``), so that nothing before the dump (an import's transient
allocation) hides what the dump adds: the teacher's weights, its activations for one batch, the
logits and the writer's buffers. The weights' size is that of the checkpoint's tensors.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

VOCAB = 32_000


def build(folder: Path, *, layers: int, width: int, documents: int) -> Path:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    names = ["<|endoftext|>", "[UNK]", *(f"w{i}" for i in range(VOCAB - 2))]
    core = Tokenizer(models.WordLevel({n: i for i, n in enumerate(names)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<|endoftext|>", unk_token="[UNK]"
    )
    config = GPT2Config(vocab_size=VOCAB, n_positions=128, n_embd=width, n_layer=layers, n_head=8)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    for dtype in ("float32", "bfloat16"):
        model.to(getattr(torch, dtype)).save_pretrained(folder / dtype)
        tokenizer.save_pretrained(folder / dtype)
    rng = random.Random(0)
    with (folder / "corpus.jsonl").open("w") as stream:
        for _ in range(documents):
            words = " ".join(f"w{int(rng.paretovariate(1.0)) % (VOCAB - 2)}" for _ in range(100))
            stream.write(json.dumps({"text": words}) + "\n")
    return folder


def dump_once(folder: Path, dtype: str, out: Path) -> dict[str, object]:
    """Run in a fresh process: the peak-RSS growth of one dump."""
    import torch  # noqa: F401  (imported before the baseline, as a dump imports it)
    import transformers  # noqa: F401

    from kdcache.config import DumpConfig
    from kdcache.lm.dump import dump_lm

    before = _status_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) restarts from here
    result = dump_lm(
        DumpConfig(
            teacher=f"hf:{folder / dtype}",
            dataset=f"text:{folder / 'corpus.jsonl'}:64",
            out=str(out),
            encoding="topk:32",
            batch_size=2,
            writer_workers=1,
        )
    )
    peak = _status_mb("VmHWM")
    weights = sum(file.stat().st_size for file in (folder / dtype).glob("*.safetensors"))
    return {
        "dtype": dtype,
        "weights_mb": weights / 2**20,
        "before_mb": before,
        "peak_mb": peak,
        "peak_growth_mb": peak - before,
        "tokens": result.num_tokens,
    }


def _status_mb(field: str) -> float:
    """A ``/proc/self/status`` memory field (reported in kB) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field} (Linux only)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--documents", type=int, default=40)
    parser.add_argument("--child", nargs=3, metavar=("FOLDER", "DTYPE", "OUT"), help="internal")
    args = parser.parse_args()
    if args.child:
        folder, dtype, out = args.child
        print(json.dumps(dump_once(Path(folder), dtype, Path(out))))
        return
    with tempfile.TemporaryDirectory() as scratch:
        folder = build(
            Path(scratch), layers=args.layers, width=args.width, documents=args.documents
        )
        for dtype in ("float32", "bfloat16"):
            child = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    str(folder),
                    dtype,
                    str(folder / f"{dtype}.zarr"),
                ],
                check=True,
                capture_output=True,
                text=True,
            )
            figures = json.loads(child.stdout.strip().splitlines()[-1])
            print(
                f"{figures['dtype']:>9}: weights {figures['weights_mb']:6.1f} MB, RSS before the "
                f"dump {figures['before_mb']:6.1f} MB, peak during it {figures['peak_mb']:6.1f} MB "
                f"(growth {figures['peak_growth_mb']:6.1f} MB, {figures['tokens']} tokens)",
                flush=True,
            )


if __name__ == "__main__":
    main()
