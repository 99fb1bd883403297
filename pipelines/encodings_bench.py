"""Size and fidelity of every kdcache encoding, on digits (C = 10) and on 1,000-class logits.

    python pipelines/encodings_bench.py --out /tmp/kdcache-encodings            # both parts
    python pipelines/encodings_bench.py --out /tmp/kdcache-encodings --part c1000

Uses only kdcache's public API. Prints Markdown tables (docs/encodings.md and docs/benchmarks.md
hold a run's output) and writes them, with the raw numbers as JSON, under --out.

* ``digits``: trains a cnn:16 teacher, dumps it with every encoding, distills an mlp:16 student
  from each store (KD, T = 4, alpha = 0.7) with 3 seeds; the CE-only student is the baseline.
* ``c1000``: logits from :func:`imagenet_like_logits`, written through ``create_store`` with each
  encoding, read back at T = 1, 2, 4, 8 (and between the knots) and compared with the true
  softmax and with FKD's best case at the same K. A last table compares top-k with a sampled
  sparse target (Sparse Logit Sampling) of the same size by the error of the KD gradient.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdcache import DistillConfig, DumpConfig, TrainConfig, create_store, open_store
from kdcache.dump.teacher import dump_teacher
from kdcache.logits.fidelity import kl_divergence
from kdcache.store.tools.report import inspect_store
from kdcache.train.loop import distill, train

TEMPERATURES = (1.0, 2.0, 4.0, 8.0)
BETWEEN_KNOTS = (0.5, 1.5, 3.0, 6.0, 16.0)


def imagenet_like_features(
    rng: np.random.Generator, num_samples: int, num_classes: int = 1000
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit class prototypes ``(C, 64)``, unit sample features ``(N, 64)`` and labels ``(N,)``
    of :func:`imagenet_like_logits` (which adds the logit noise), drawn from ``rng``."""
    dim, groups = 64, num_classes // 10
    centres = rng.normal(size=(groups, dim))
    prototypes = centres[np.arange(num_classes) % groups] + 0.7 * rng.normal(
        size=(num_classes, dim)
    )
    prototypes /= np.linalg.norm(prototypes, axis=1, keepdims=True)
    labels = rng.integers(num_classes, size=num_samples)
    features = prototypes[labels] + 1.6 * rng.normal(size=(num_samples, dim)) / np.sqrt(dim)
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    return prototypes, features, labels


def imagenet_like_logits(
    num_samples: int, num_classes: int = 1000, *, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Logits of a confident many-class classifier, with their true labels.

    Classes are unit prototypes in 64 dimensions, grouped 10 to a super-class (a shared centre
    plus 0.7 x Gaussian offset) so that every class has a few similar siblings. A sample is its
    class prototype plus noise, normalised; its logits are 32 x cosine similarity to every
    prototype plus N(0, 0.5^2). With these constants the "teacher" is 81% accurate, its mean
    max probability is 0.72 and its entropy 1.0 nats at T = 1: a peaked head (the class and
    its siblings), then a long Gaussian-like tail, as a ResNet-50 on ImageNet.
    """
    rng = np.random.default_rng(seed)
    prototypes, features, labels = imagenet_like_features(rng, num_samples, num_classes)
    logits = 32.0 * features @ prototypes.T + 0.5 * rng.normal(size=(num_samples, num_classes))
    return logits.astype(np.float32), labels


def fkd_best_kl(logits: torch.Tensor, k: int, temperature: float) -> float:
    """FKD's best case: exact top-k probabilities at T, the remaining mass spread uniformly."""
    log_p = torch.log_softmax(logits.double() / temperature, dim=1)
    p = log_p.exp()
    top = p.topk(k, dim=1)
    rest = ((1 - top.values.sum(dim=1, keepdim=True)) / (p.shape[1] - k)).clamp_min(1e-300)
    q = rest.expand_as(p).clone().scatter_(1, top.indices, top.values)
    return torch.where(p > 0, p * (log_p - q.log()), 0.0).sum(dim=1).mean().item()


def mean_kl(reader, logits: torch.Tensor, temperature: float, block: int = 4096) -> float:
    total = 0.0
    for start in range(0, len(logits), block):
        rows = np.arange(start, min(start + block, len(logits)))
        total += (
            kl_divergence(
                logits[rows], reader.read_dense(rows, temperature=temperature), temperature
            )
            .sum()
            .item()
        )
    return total / len(logits)


def write(path: Path, encoding: str, logits: np.ndarray, labels: np.ndarray) -> None:
    shutil.rmtree(path, ignore_errors=True)
    writer = create_store(
        path, num_samples=len(logits), num_classes=logits.shape[1], encoding=encoding, labels=labels
    )
    for start in range(0, len(logits), 256):
        writer.write(np.arange(start, min(start + 256, len(logits))), logits[start : start + 256])
    writer.finalize()


def gradient_error(
    logits: torch.Tensor, k: int, temperature: float, seed: int = 0
) -> tuple[float, float]:
    """Mean ||p_hat - p||^2 (the KD gradient's error, up to 1/T) for top-k with the exact tail
    mass spread uniformly, and for k classes sampled from p_T itself (Sparse Logit Sampling's
    estimator, given the best case: its proposal drawn at the training temperature)."""
    p = torch.softmax(logits.double() / temperature, dim=1)
    top = p.topk(k, dim=1)
    rest = (1 - top.values.sum(dim=1, keepdim=True)) / (p.shape[1] - k)
    topk_hat = rest.expand_as(p).clone().scatter_(1, top.indices, top.values)
    draws = torch.multinomial(p, k, replacement=True, generator=torch.Generator().manual_seed(seed))
    sampled_hat = torch.zeros_like(p).scatter_add_(
        1, draws, torch.full(draws.shape, 1.0 / k, dtype=p.dtype)
    )
    return ((topk_hat - p) ** 2).sum(1).mean().item(), ((sampled_hat - p) ** 2).sum(1).mean().item()


def run_c1000(out: Path, num_samples: int) -> dict:
    logits_np, labels = imagenet_like_logits(num_samples)
    logits = torch.from_numpy(logits_np)
    rows = []
    for encoding in ("float32", "float16", "int8", "topk:50", "topk:20", "topk:10", "topk:5"):
        path = out / "c1000" / f"{encoding.replace(':', '')}.zarr"
        started = time.perf_counter()
        write(path, encoding, logits_np, labels)
        seconds = time.perf_counter() - started
        reader = open_store(path)
        report = inspect_store(path)
        row: dict[str, Any] = {
            "encoding": encoding,
            "bytes_per_sample": report.bytes_per_sample,
            "payload_bytes": reader.encoding.row_nbytes(1000),
            "compression": report.compression_ratio,
            "write_s": seconds,
            "teacher_accuracy": report.teacher_accuracy,
            "kl": {str(t): mean_kl(reader, logits, t) for t in TEMPERATURES},
            "top1_agreement": float(
                (
                    reader.read_dense(np.arange(num_samples), temperature=1.0).argmax(1)
                    == logits.argmax(1)
                )
                .double()
                .mean()
            ),
        }
        if encoding.startswith("topk:"):
            k = int(encoding.split(":")[1])
            row["fkd_best_kl"] = {str(t): fkd_best_kl(logits, k, t) for t in TEMPERATURES}
            if k == 20:
                row["between_knots"] = {
                    str(t): {
                        "kdcache": mean_kl(reader, logits, t),
                        "fkd_best": fkd_best_kl(logits, 20, t),
                    }
                    for t in BETWEEN_KNOTS
                }
        rows.append(row)
        print(json.dumps(row), flush=True)
    sampled_rows = min(4096, num_samples)
    sampling = {
        str(t): dict(
            zip(("topk", "sampled"), gradient_error(logits[:sampled_rows], 20, t), strict=False)
        )
        for t in (1.0, 4.0)
    }
    return {
        "num_samples": num_samples,
        "rows": rows,
        "gradient_error_k20": sampling,
        "gradient_rows": sampled_rows,
    }


def run_digits(out: Path, seeds: int, epochs: int) -> dict:
    teacher_dir = out / "digits" / "teacher"
    shutil.rmtree(teacher_dir, ignore_errors=True)
    teacher = train(TrainConfig(model="cnn:16", out=str(teacher_dir), epochs=20, device="cpu"))
    common: dict[str, Any] = dict(
        student="mlp:16", epochs=epochs, temperature=4.0, alpha=0.7, device="cpu", overwrite=True
    )
    baseline = [
        train(
            TrainConfig(
                model="mlp:16",
                out=str(out / "digits" / f"ce-{seed}"),
                epochs=epochs,
                seed=seed,
                device="cpu",
                overwrite=True,
            )
        ).final
        for seed in range(seeds)
    ]
    rows = []
    for encoding in ("float32", "float16", "int8", "topk:5", "topk:3", "topk:1"):
        store = out / "digits" / f"{encoding.replace(':', '')}.zarr"
        dump_teacher(
            DumpConfig(
                teacher="cnn:16",
                weights=str(teacher_dir / "best.pt"),
                out=str(store),
                encoding=encoding,
                device="cpu",
                overwrite=True,
            )
        )
        report = inspect_store(store)
        accuracies = [
            distill(
                DistillConfig(
                    cache=str(store),
                    seed=seed,
                    out=str(out / "digits" / f"kd-{encoding}-{seed}"),
                    **common,
                )
            ).final
            for seed in range(seeds)
        ]
        assert report.fidelity is not None
        row = {
            "encoding": encoding,
            "bytes_per_sample": report.bytes_per_sample,
            "compression": report.compression_ratio,
            "kl": dict(
                zip(
                    map(str, report.fidelity["temperatures"]),
                    report.fidelity["mean_kl"],
                    strict=False,
                )
            ),
            "fidelity_rows": report.fidelity["num_samples"],
            "top1_agreement": report.fidelity["top1_agreement"],
            "student_acc": accuracies,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    return {
        "teacher_val_acc": teacher.best,
        "ce_student_acc": baseline,
        "rows": rows,
        "epochs": epochs,
    }


def _acc(values: list[float]) -> str:
    return (
        f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"
        if len(values) > 1
        else f"{values[0]:.2f}"
    )


def tables(results: dict) -> str:
    parts = []
    if "digits" in results:
        d = results["digits"]
        parts += [
            f"### C = 10 (digits, N = 1,437; teacher cnn:16 {d['teacher_val_acc']:.2f}% val; "
            "student mlp:16, "
            f"{d['epochs']} epochs, KD T = 4, alpha = 0.7; CE-only student "
            f"{_acc(d['ce_student_acc'])}%)",
            "",
            "| encoding | B/sample on disk | vs float32 raw | KL T=1 | KL T=4 | top-1 agreement "
            f"| student acc % ({len(d['ce_student_acc'])} seeds) |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in d["rows"]:
            parts.append(
                f"| {r['encoding']} | {r['bytes_per_sample']:.1f} | {r['compression']:.2f}x | "
                f"{r['kl']['1.0']:.2e} | "
                f"{r['kl']['4.0']:.2e} | {100 * r['top1_agreement']:.1f}% | "
                f"{_acc(r['student_acc'])} |"
            )
        parts.append("")
    if "c1000" in results:
        c = results["c1000"]
        parts += [
            f"### C = 1000 (imagenet_like_logits, N = {c['num_samples']:,})",
            "",
            "| encoding | B/sample on disk | raw payload B | vs float32 raw | KL T=1 | KL T=2 | "
            "KL T=4 | KL T=8 | top-1 agreement |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in c["rows"]:
            kl = " | ".join(f"{r['kl'][str(t)]:.3g}" for t in TEMPERATURES)
            parts.append(
                f"| {r['encoding']} | {r['bytes_per_sample']:.1f} | {r['payload_bytes']} | "
                f"{r['compression']:.1f}x | {kl} | "
                f"{100 * r['top1_agreement']:.2f}% |"
            )
        parts += [
            "",
            "FKD's best case at the same K (exact top-k probabilities at that T, rest uniform), "
            "and kdcache's excess over it:",
            "",
            "| K | FKD best T=1 | T=2 | T=4 | T=8 | kdcache / FKD best - 1 (T=1, 2, 4, 8) |",
            "|---|---|---|---|---|---|",
        ]
        for r in c["rows"]:
            if "fkd_best_kl" in r:
                best = " | ".join(f"{r['fkd_best_kl'][str(t)]:.4g}" for t in TEMPERATURES)
                excess = ", ".join(
                    f"{r['kl'][str(t)] / r['fkd_best_kl'][str(t)] - 1:+.1e}" for t in TEMPERATURES
                )
                parts.append(f"| {r['encoding'][5:]} | {best} | {excess} |")
        between = next(r["between_knots"] for r in c["rows"] if "between_knots" in r)
        parts += [
            "",
            "topk:20 at temperatures between and beyond the stored knots (train-time T):",
            "",
            "| T | " + " | ".join(between) + " |",
            "|---" * (len(between) + 1) + "|",
            "| kdcache KL | " + " | ".join(f"{v['kdcache']:.4g}" for v in between.values()) + " |",
            "| FKD best KL | "
            + " | ".join(f"{v['fkd_best']:.4g}" for v in between.values())
            + " |",
        ]
        g = c["gradient_error_k20"]
        parts += [
            "",
            f"KD gradient error E||p_hat - p||^2 at 20 classes per row ({c['gradient_rows']:,} "
            "rows):",
            "",
            "| T | topk:20 + exact tail mass | 20 classes sampled from p_T |",
            "|---|---|---|",
        ]
        parts += [f"| {float(t):g} | {v['topk']:.3g} | {v['sampled']:.3g} |" for t, v in g.items()]
    return "\n".join(parts) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--out", default="/tmp/kdcache-encodings", help="Folder for stores, runs and results."
    )
    parser.add_argument(
        "--part", choices=("all", "digits", "c1000"), default="all", help="Which benchmark to run."
    )
    parser.add_argument("--samples", type=int, default=20_000, help="Rows of 1,000-class logits.")
    parser.add_argument("--seeds", type=int, default=3, help="Student seeds per digits store.")
    parser.add_argument("--epochs", type=int, default=15, help="Student epochs on digits.")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    if args.part in ("all", "c1000"):
        results["c1000"] = run_c1000(out, args.samples)
    if args.part in ("all", "digits"):
        results["digits"] = run_digits(out, args.seeds, args.epochs)
    (out / f"results-{args.part}.json").write_text(json.dumps(results, indent=2) + "\n")
    text = tables(results)
    (out / f"tables-{args.part}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
