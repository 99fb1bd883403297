"""Bytes per token of sparse encodings at language-model vocabularies, on real or synthetic rows.

    PYTHONPATH=. python pipelines/token_bytes_bench.py [--tokens 4096] [--vocab 131072 ...]
    PYTHONPATH=. python pipelines/token_bytes_bench.py --teacher OUT/teacher-128k/best \
        --text OUT/heldout.jsonl [--tokens 2048]

With ``--teacher`` (a causal LM folder, e.g. a teacher pipelines/lm_stdlib.py trained) the rows
are its next-token logits over the documents of ``--text`` (JSON Lines, one ``text`` per line);
several ``--teacher`` go with as many ``--text``. Otherwise each row imitates a next-token
distribution: token ids follow a BPE vocabulary's order (low ids frequent: Zipf's law over a
noisy frequency rank), a row's logits are 0.6 x the unigram log-prior plus Gaussian noise
(sigma 1.5), and a few dozen tokens drawn from the unigram get a context boost of 4 to 10 nats.
The rows' entropy and top-1 probability are printed beside the bytes so that the realism can be
judged.

Per encoding and vocabulary it writes a store with kdcache.create_store and reports the bytes of
the per-token arrays' chunks on disk (the store's fixed files left out) divided by the tokens,
the same arrays coded as earlier releases stored them (plain bytes, zstd level 1: measured by
compressing each array's chunk with numcodecs' Zstd), the raw payload, and the KL(T = 1, 2) the
writer measured (every 8th row; for ``sampled:S`` that of the draws' shares against the row).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import zarr
from numcodecs import Zstd

from kdcache.lm.models import load_causal_lm
from kdcache.logits.encodings import parse_encoding
from kdcache.store.read.reader import open_store
from kdcache.store.write.writer import create_store

BLOCK = 256


def zipf_rows(tokens: int, vocab: int, seed: int) -> np.ndarray:
    """``tokens`` synthetic next-token logit rows over ``vocab`` ids, float32."""
    rng = np.random.default_rng(seed)
    rank = np.arange(1, vocab + 1, dtype=np.float64)
    # A BPE vocabulary lists frequent pieces first, roughly: ids by a noisy frequency rank.
    order = np.argsort(np.log(rank) + rng.normal(0.0, 1.0, vocab))
    log_prior = np.empty(vocab)
    log_prior[order] = -1.1 * np.log(rank)
    log_prior -= np.log(np.exp(log_prior).sum())
    prior = np.exp(log_prior)
    rows = np.empty((tokens, vocab), dtype=np.float32)
    for start in range(0, tokens, BLOCK):
        count = min(BLOCK, tokens - start)
        block = 0.6 * log_prior + rng.normal(0.0, 1.5, (count, vocab))
        for row in block:
            boosted = rng.choice(vocab, size=40, p=prior)
            row[boosted] += rng.uniform(4.0, 10.0, boosted.size)
        rows[start : start + count] = block
    return rows


def teacher_rows(teacher: Path, text: Path, tokens: int, max_length: int = 128) -> np.ndarray:
    """Up to ``tokens`` next-token logit rows (float32) of the causal LM saved in ``teacher``
    over the documents of ``text`` (JSON Lines with a ``text`` field, as lm_stdlib.py writes
    them), each cut into windows of ``max_length`` tokens, taken in turn from every document (so
    that one long document does not make all the rows), every position of a window kept."""
    lm = load_causal_lm(f"hf:{teacher}")
    lm.model.eval()
    documents = [
        lm.tokenizer(json.loads(line)["text"])["input_ids"]
        for line in text.read_text().splitlines()
    ]
    windows = [
        window
        for round_windows in itertools.zip_longest(
            *(
                [ids[start : start + max_length] for start in range(0, len(ids) - 1, max_length)]
                for ids in documents
            )
        )
        for window in round_windows
        if window is not None and len(window) > 1
    ]
    rows: list[np.ndarray] = []
    kept = 0
    for window in windows:
        ids = torch.tensor([window])
        with torch.no_grad():
            logits = lm.logits(ids, torch.ones_like(ids))[0].numpy()
        rows.append(logits[: tokens - kept])
        kept += len(rows[-1])
        if kept >= tokens:
            break
    return np.concatenate(rows)


def describe(rows: np.ndarray) -> dict[str, float]:
    shifted = rows[:512].astype(np.float64) - rows[:512].max(axis=1, keepdims=True)
    probs = np.exp(shifted)
    probs /= probs.sum(axis=1, keepdims=True)
    entropy = -(probs * np.log(np.maximum(probs, 1e-300))).sum(axis=1)
    return {"entropy_nats": float(entropy.mean()), "top1_prob": float(probs.max(axis=1).mean())}


def row_array_bytes(store: Path, names: list[str]) -> int:
    """Bytes of the chunks of ``names`` (each array's ``c/`` folder) in the store folder."""
    return sum(
        file.stat().st_size
        for name in names
        for file in (store / name / "c").rglob("*")
        if file.is_file()
    )


def plain_zstd_bytes(store: Path, names: list[str]) -> int:
    """The same arrays as plain bytes + zstd level 1 per chunk (how earlier releases wrote them)."""
    reader = open_store(store)
    zstd = Zstd(level=1)
    total = 0
    for name in names:
        array = reader.group[name]
        assert isinstance(array, zarr.Array)
        rows = array.chunks[0]
        for start in range(0, array.shape[0], rows):
            total += len(zstd.encode(np.ascontiguousarray(array[start : start + rows])))
    return total


def measure(rows: np.ndarray, encoding: str, folder: Path) -> dict[str, float]:
    tokens, vocab = rows.shape
    store = folder / f"{encoding.replace(':', '-')}-{vocab}.zarr"
    writer = create_store(store, num_samples=tokens, num_classes=vocab, encoding=encoding)
    for start in range(0, tokens, BLOCK):
        stop = min(tokens, start + BLOCK)
        writer.write(np.arange(start, stop), rows[start:stop])
    writer.finalize()
    names = list(parse_encoding(encoding).layout(vocab))
    fidelity = open_store(store).metadata.fidelity or {}
    kl = dict(zip(fidelity.get("temperatures", []), fidelity.get("mean_kl", []), strict=False))
    return {
        "bytes_per_token": row_array_bytes(store, names) / tokens,
        "plain_zstd_bytes_per_token": plain_zstd_bytes(store, names) / tokens,
        "raw_bytes_per_token": float(parse_encoding(encoding).row_nbytes(vocab)),
        "kl_t1": float(kl.get(1.0, math.nan)),
        "kl_t2": float(kl.get(2.0, math.nan)),
        "mass_outside_draws": mass_outside_draws(rows, store)
        if encoding.startswith("sampled:")
        else math.nan,
    }


def mass_outside_draws(rows: np.ndarray, store: Path) -> float:
    """The teacher's mean probability (T = 1) on the classes a ``sampled:S`` store never drew."""
    reader = open_store(store)
    classes = reader.read_rows("sample_indices", 0, len(rows)).astype(np.int64)
    drawn = reader.read_rows("sample_counts", 0, len(rows)) > 0
    log_probs = torch.log_softmax(torch.from_numpy(rows).double(), dim=1).numpy()
    kept = np.where(drawn, np.exp(np.take_along_axis(log_probs, classes, axis=1)), 0.0)
    return float(1.0 - kept.sum(axis=1).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 131072, 152064, 262144])
    parser.add_argument(
        "--teacher", type=Path, nargs="+", default=[], help="causal LM folders (real rows)"
    )
    parser.add_argument("--text", type=Path, nargs="+", default=[], help="one per --teacher")
    parser.add_argument(
        "--encodings",
        nargs="+",
        default=[
            *(f"topk:{k}{bits}" for k in (8, 16, 32, 64, 128) for bits in ("", ":8")),
            *(f"sampled:{s}" for s in (8, 16, 24, 32, 48, 64)),
        ],
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if len(args.text) != len(args.teacher):
        parser.error(f"give one --text per --teacher, got {len(args.text)} for {len(args.teacher)}")
    sources: list[tuple[str, Callable[[], np.ndarray]]] = [
        (str(teacher), functools.partial(teacher_rows, teacher, text, args.tokens))
        for teacher, text in zip(args.teacher, args.text, strict=True)
    ] or [
        (f"synthetic V={vocab}", functools.partial(zipf_rows, args.tokens, vocab, vocab))
        for vocab in args.vocab
    ]
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for name, build in sources:
            rows = build()
            shape = describe(rows)
            print(
                f"{name}: {len(rows)} rows, V = {rows.shape[1]}, entropy "
                f"{shape['entropy_nats']:.2f} nats, top-1 p {shape['top1_prob']:.2f}"
            )
            for encoding in args.encodings:
                figures = measure(rows, encoding, Path(scratch))
                results.append(
                    {"rows": name, "vocab": rows.shape[1], "encoding": encoding, **shape, **figures}
                )
                print(
                    f"  {encoding:>10}: {figures['bytes_per_token']:6.1f} B/token "
                    f"(plain bytes + zstd {figures['plain_zstd_bytes_per_token']:6.1f}, raw "
                    f"{figures['raw_bytes_per_token']:5.0f}), KL(T=1) {figures['kl_t1']:.3g}, "
                    f"KL(T=2) {figures['kl_t2']:.3g}"
                    + (
                        ""
                        if math.isnan(figures["mass_outside_draws"])
                        else f", mass outside the draws {figures['mass_outside_draws']:.3f}"
                    ),
                    flush=True,
                )
            del rows
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
