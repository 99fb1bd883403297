"""Merge fidelity and bytes at C = 1000: three teachers' topk:K stores merged with `kdcache merge`.

Three synthetic but realistic 1,000-class teachers (encodings_bench's ImageNet-like logits: one
set of class prototypes and samples, each teacher seeing the samples through its own feature
noise and logit noise, at its own confidence) are written as topk:K stores, then merged as the
probability-space mixture at T = 1 and T = 4 into topk:K' stores with
:func:`kdcache.store.tools.merge.merge_stores` (what ``kdcache merge A B C --out M --mode mixture
--temperature T --top-k K' [--bits BITS]`` runs; with ``--bits`` the output is
``topk:K':BITS``, its values in BITS-bit codes). Two sets of teachers: ``different`` (feature
noise 0.6-0.8, logit scales 28-36: different models, whose top-K sets overlap little) and
``similar`` (feature noise 0.25, one scale: seeds of one model). For each merge it prints, in nats
(mean over rows, float64):

- KL(mixture || merged): the mixture of the three stores as they read back at T (each one's
  top-K plus its exact tail mass spread uniformly) against the merged store read back at T: what
  the merge itself loses (the target: <= 1e-3);
- KL(teachers' mixture || merged): against the mixture of the three dense teachers, which also
  counts what the topk:K inputs had already lost;
- the merged store's bytes on disk over the mean bytes of one input store (target: <= 1.5x).

Run from the repository root: ``PYTHONPATH=. python pipelines/merge_bench.py --out /tmp/merge``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
from pathlib import Path

import numpy as np
import torch
from encodings_bench import imagenet_like_features

from kdcache import create_store, open_store
from kdcache.store.format.location import parse_location
from kdcache.store.tools.merge import merge_stores

#: Each teacher's logit scale (confidence) and feature noise.
TEACHER_SETS = {
    "different": ((32.0, 0.6), (28.0, 0.8), (36.0, 0.7)),
    "similar": ((32.0, 0.25), (32.0, 0.25), (32.0, 0.25)),
}


def teachers_logits(
    num_samples: int, num_classes: int, seed: int, teachers: str = "different"
) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    prototypes, features, _labels = imagenet_like_features(rng, num_samples, num_classes)
    dim = features.shape[1]
    out = []
    for scale, noise in TEACHER_SETS[teachers]:
        seen = features + noise * rng.normal(size=features.shape) / np.sqrt(dim)
        seen /= np.linalg.norm(seen, axis=1, keepdims=True)
        logits = scale * seen @ prototypes.T + 0.5 * rng.normal(size=(num_samples, num_classes))
        out.append(logits.astype(np.float32))
    return out


def write_store(path: Path, logits: np.ndarray, encoding: str) -> Path:
    writer = create_store(
        path,
        num_samples=len(logits),
        num_classes=logits.shape[1],
        encoding=encoding,
        dataset={"spec": "synthetic-imagenet-like", "split": "train"},
    )
    writer.write(np.arange(len(logits)), logits)
    writer.finalize()
    return path


def disk_bytes(path: Path) -> int:
    nbytes = parse_location(path).nbytes()
    assert nbytes is not None  # a local folder
    return nbytes


def mean_kl(p_log: torch.Tensor, q_log: torch.Tensor) -> float:
    return float((p_log.exp() * (p_log - q_log)).sum(dim=1).mean())


def read_log_probs(path: Path, temperature: float, rows: int) -> torch.Tensor:
    logits = open_store(path).read_dense(np.arange(rows), temperature=temperature)
    return torch.log_softmax(logits.double() / temperature, dim=1)


def mixture_log_probs(members: list[torch.Tensor]) -> torch.Tensor:
    return torch.logsumexp(torch.stack(members), dim=0) - np.log(len(members))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--teachers", nargs="+", default=list(TEACHER_SETS), choices=TEACHER_SETS)
    parser.add_argument("--k", type=int, nargs="+", default=[20, 50])
    parser.add_argument(
        "--kept",
        type=float,
        nargs="+",
        default=[1.5, 2.0, 2.5],
        help="Output K' as multiples of the inputs' K.",
    )
    parser.add_argument(
        "--bits",
        type=int,
        nargs="+",
        default=[0, 8],
        help="Code bits of the output's values (topk:K':BITS); 0 for float16 values (topk:K').",
    )
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    print(
        "| teachers | inputs | T | output | KL(mixture of the stores ‖ merged) | KL(teachers' "
        "mixture ‖ merged) | merged bytes / one input's |"
    )
    print("|---|---|---|---|---|---|---|")
    for teachers in args.teachers:
        logits = teachers_logits(args.samples, 1000, seed=0, teachers=teachers)
        for k in args.k:
            inputs = [
                write_store(args.out / f"{teachers}{i}-top{k}.zarr", rows, f"topk:{k}")
                for i, rows in enumerate(logits)
            ]
            input_bytes = statistics.mean(disk_bytes(path) for path in inputs)
            for temperature in (1.0, 4.0):
                stores = mixture_log_probs(
                    [read_log_probs(p, temperature, args.samples) for p in inputs]
                )
                dense = mixture_log_probs(
                    [
                        torch.log_softmax(torch.from_numpy(z).double() / temperature, 1)
                        for z in logits
                    ]
                )
                for kept in (round(k * factor) for factor in args.kept):
                    for bits in args.bits:
                        out = args.out / f"{teachers}-top{k}-T{temperature:g}-K{kept}-{bits}.zarr"
                        result = merge_stores(
                            inputs,
                            out,
                            mode="mixture",
                            temperature=temperature,
                            top_k=kept,
                            bits=bits or None,
                        )
                        merged = read_log_probs(out, temperature, args.samples)
                        print(
                            f"| {teachers} | topk:{k} x 3 | {temperature:g} | {result.encoding} | "
                            f"{mean_kl(stores, merged):.2g} | {mean_kl(dense, merged):.3g} | "
                            f"{disk_bytes(out) / input_bytes:.2f}x |",
                            flush=True,
                        )
                        shutil.rmtree(out)


if __name__ == "__main__":
    main()
