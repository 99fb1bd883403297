"""Measure token-level stores: student perplexity per encoding (3 seeds), bytes per token, feed
and dump throughput. Figures for docs/results.md and docs/benchmarks.md.

    python pipelines/lm_results.py OUT [--device cuda] [--seeds 0,1,2] [--quick]

1. Builds the pydoc_data.topics corpus, a 1024-token BPE tokenizer and GPT-2 configs
   (pipelines/lm_setup.py), trains the teacher with cross-entropy.
2. Dumps it once per encoding (float16, topk:8/32/128, sampled:16/48: sampled:S costs 3S bytes a
   token, so sampled:16 matches topk:8's 48 B and sampled:48 topk:32's 144 B).
3. Trains the student with CE only and distills it from every store (forward KL, T = 1,
   alpha = 0.5: the sampled draws are taken at T = 1), for every seed; held-out perplexity.
4. Bytes per token of each encoding at a 32,000-token vocabulary, on synthetic Zipf-like logits,
   and the in-memory token feed's throughput on that topk:32 store.
Writes OUT/results.json and prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lm_setup import documents, train_tokenizer, write_config

from kdcache.config import DistillConfig, DumpConfig, TrainConfig
from kdcache.lm.dump import dump_lm
from kdcache.store.format.layout import store_nbytes
from kdcache.store.sequence import create_sequence_store, open_sequence_store
from kdcache.train.loop import distill, train

ENCODINGS = ("float16", "topk:8", "topk:32", "topk:128", "sampled:16", "sampled:48")


def build(out: Path, *, vocab: int, teacher: str, student: str, every: int) -> str:
    out.mkdir(parents=True, exist_ok=True)
    texts = documents(1500)[::every]
    with (out / "topics.jsonl").open("w") as stream:
        for text in texts:
            stream.write(json.dumps({"text": text}) + "\n")
    tokenizer = train_tokenizer(texts, vocab)
    write_config(out / "teacher-init", tokenizer, teacher, 128)
    write_config(out / "student-init", tokenizer, student, 128)
    return f"text:{out / 'topics.jsonl'}:128"


def synthetic_bytes_per_token(out: Path, *, vocab: int, tokens: int) -> dict:
    """Bytes per token on disk of each encoding for Zipf-like logits over ``vocab`` tokens."""
    rng = np.random.default_rng(0)
    lengths = [128] * (tokens // 128)
    sequences = [rng.integers(0, vocab, size=n) for n in lengths]
    bias = -1.0 * np.log1p(np.arange(vocab, dtype=np.float32))
    sizes = {}
    for encoding in ("float16", "topk:8", "topk:32", "topk:128", "sampled:16", "sampled:48"):
        path = out / f"synthetic-{encoding.replace(':', '')}.zarr"
        writer = create_sequence_store(
            path, sequences=sequences, vocab_size=vocab, encoding=encoding, overwrite=True
        )
        block_rng = np.random.default_rng(1)
        for start in range(0, len(sequences), 16):
            samples = list(range(start, min(start + 16, len(sequences))))
            rows = sum(lengths[i] - 1 for i in samples)
            logits = bias + 3.0 * block_rng.standard_normal((rows, vocab), dtype=np.float32)
            writer.write(samples, logits)
        writer.finalize()
        store = open_sequence_store(path)
        nbytes = store_nbytes(path)
        assert nbytes is not None  # a local folder has a size
        sizes[encoding] = nbytes / store.num_tokens
    return sizes


def feed_throughput(path: Path, *, batch: int = 64, repeats: int = 20) -> float:
    """Tokens per second that random batches of ``batch`` sequences come out of a loaded store."""
    store = open_sequence_store(path)
    store.store.load()
    rng = np.random.default_rng(0)
    store.read(rng.integers(0, store.num_sequences, size=batch))  # warm
    started, tokens = time.perf_counter(), 0
    for _ in range(repeats):
        rows = store.read(rng.integers(0, store.num_sequences, size=batch))
        tokens += rows.shape[0]
    return tokens / (time.perf_counter() - started)


def save(out: Path, results: dict) -> None:
    """Results so far: a run cut short still leaves what it measured."""
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--device", default=None)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--teacher", default="2x128")
    parser.add_argument("--student", default="2x64")
    parser.add_argument("--teacher-epochs", type=int, default=5)
    parser.add_argument("--student-epochs", type=int, default=2)
    parser.add_argument("--synthetic-tokens", type=int, default=16384)
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per step")
    parser.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate")
    parser.add_argument("--every", type=int, default=1, help="keep every EVERY-th document")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 epoch, 1 seed")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.quick:
        args.teacher_epochs, args.student_epochs, seeds = 1, 1, seeds[:1]
        args.synthetic_tokens = 1024
    out = args.out
    data = build(out, vocab=1024, teacher=args.teacher, student=args.student, every=args.every)
    results: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "seeds": seeds}

    started = time.perf_counter()
    teacher = train(
        TrainConfig(
            model=f"hf:{out / 'teacher-init'}",
            dataset=data,
            epochs=args.teacher_epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            device=args.device,
            out=str(out / "teacher"),
            overwrite=True,
        )
    )
    results["teacher"] = {"val_ppl": teacher.final, "wall_s": time.perf_counter() - started}
    save(out, results)
    print(f"teacher ppl {teacher.final:.3f}", flush=True)

    stores = {}
    for encoding in ENCODINGS:
        path = out / f"teacher-{encoding.replace(':', '')}.zarr"
        dumped = dump_lm(
            DumpConfig(
                teacher=f"hf:{out / 'teacher' / 'best'}",
                dataset=data,
                out=str(path),
                encoding=encoding,
                batch_size=64,
                device=args.device,
                overwrite=True,
            )
        )
        stores[encoding] = path
        results.setdefault("dump", {})[encoding] = {
            "bytes_per_token": dumped.bytes_per_token,
            "tokens_per_s": dumped.tokens_per_s,
            "fidelity_kl_t1": None if dumped.fidelity is None else dumped.fidelity.kl_at(1.0),
        }
        print(f"dump {encoding}: {dumped.bytes_per_token:.1f} B/token", flush=True)
        save(out, results)

    common = dict(
        epochs=args.student_epochs, batch_size=args.batch_size, lr=args.lr, device=args.device
    )
    runs: dict[str, list[float]] = {}
    for seed in seeds:
        ce = train(
            TrainConfig(
                model=f"hf:{out / 'student-init'}",
                dataset=data,
                seed=seed,
                out=str(out / f"ce-s{seed}"),
                overwrite=True,
                **common,
            )
        )
        runs.setdefault("CE only", []).append(ce.final)
        for encoding in ENCODINGS:
            run = distill(
                DistillConfig(
                    student=f"hf:{out / 'student-init'}",
                    cache=str(stores[encoding]),
                    temperature=1.0,
                    alpha=0.5,
                    seed=seed,
                    out=str(out / f"kd-{encoding.replace(':', '')}-s{seed}"),
                    overwrite=True,
                    **common,
                )
            )
            runs.setdefault(encoding, []).append(run.final)
        print(f"seed {seed}: " + ", ".join(f"{k} {v[-1]:.3f}" for k, v in runs.items()), flush=True)
        results["students"] = runs
        save(out, results)

    results["synthetic_32k_bytes_per_token"] = synthetic_bytes_per_token(
        out, vocab=32000, tokens=args.synthetic_tokens
    )
    results["feed_tokens_per_s"] = {
        "topk:32 V=32000": feed_throughput(out / "synthetic-topk32.zarr"),
        "float16 V=1024": feed_throughput(stores["float16"]),
        "topk:32 V=1024": feed_throughput(stores["topk:32"]),
    }
    save(out, results)

    print(f"\nteacher: held-out perplexity {results['teacher']['val_ppl']:.2f}")
    print("\n| student | held-out perplexity (mean ± std) | B/token (V=1024) | B/token (V=32k) |")
    print("|---|---|---|---|")
    for name, values in runs.items():
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        dump = results["dump"].get(name, {})
        size = f"{dump['bytes_per_token']:.1f}" if dump else "-"
        big = results["synthetic_32k_bytes_per_token"].get(name)
        print(
            f"| {name} | {statistics.mean(values):.2f} ± {spread:.2f} | {size} | "
            f"{'-' if big is None else f'{big:.1f}'} |"
        )
    print("\n| feed | tokens/s |\n|---|---|")
    for name, value in results["feed_tokens_per_s"].items():
        print(f"| {name} | {value:,.0f} |")
    print("\n| dump | tokens/s | KL(T=1) |\n|---|---|---|")
    for name, value in results["dump"].items():
        kl = value["fidelity_kl_t1"]
        print(f"| {name} | {value['tokens_per_s']:,.0f} | {'-' if kl is None else f'{kl:.4f}'} |")


if __name__ == "__main__":
    main()
