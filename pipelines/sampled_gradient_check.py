"""How far the ``sampled:S`` soft-loss gradient is from the dense one, and why: bias or variance.

    PYTHONPATH=. python pipelines/sampled_gradient_check.py RUN [--rows 2048]

RUN is an ``lm_stdlib.py`` output folder (its ``train-float16.zarr``, ``students.jsonl`` and
``ce-s0/best`` are read). The teacher rows are the float16 store's; the student is the CE-only
student of seed 0. Draws are taken here, with their own seeds, from those rows: ``multinomial``
(S draws with replacement, as :func:`kdcache.logits.sampled.draw_samples` takes them) and
``systematic`` (one uniform per row, S evenly spaced points on the row's CDF: each class drawn
floor(S p) or ceil(S p) times, so E[count / S] = p still, with a smaller variance).

1. Logits: the gradient of KL(p_hat || q) over the student's logits is (q - p_hat) / n, the dense
   one's (q - p) / n. Per S: the angle per token (mean), over all rows at once, and that of the
   mean gradient of R independent draws (unbiased: it falls as 1 / sqrt(R) towards 0).
2. Parameters: the angle between the gradients over every student parameter, on batches of
   B sequences (the lm_stdlib figure is B = 4), as B grows: a batch averages the draws' noise.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdcache import open_sequence_store
from kdcache.lm.models import load_causal_lm
from kdcache.lm.text import build_text_dataset, collate
from kdcache.logits.sampled import SampledLogits
from kdcache.logits.sequence_losses import TokenDistillationLoss
from kdcache.store.sequence import SequenceReader


def draw(probs: torch.Tensor, num_draws: int, scheme: str, seed: int) -> torch.Tensor:
    """Counts (n, V) of ``num_draws`` draws per row of ``probs`` (n, V) by ``scheme``."""
    generator = torch.Generator().manual_seed(seed)
    if scheme == "multinomial":
        picks = torch.multinomial(probs, num_draws, replacement=True, generator=generator)
    else:
        cdf = probs.cumsum(dim=1)
        cdf[:, -1] = 1.0
        start = torch.rand(len(probs), 1, generator=generator, dtype=probs.dtype)
        points = (start + torch.arange(num_draws, dtype=probs.dtype)) / num_draws
        picks = torch.searchsorted(cdf, points).clamp_max(probs.shape[1] - 1)
    return torch.zeros_like(probs).scatter_add_(1, picks, torch.ones_like(picks, dtype=probs.dtype))


def as_sampled(counts: torch.Tensor, num_draws: int) -> SampledLogits:
    shares, classes = (counts / num_draws).float().topk(num_draws, dim=1)
    return SampledLogits(indices=classes, probs=shares, num_classes=counts.shape[1])


def dense_rows(store: SequenceReader, samples: list[int]) -> torch.Tensor:
    rows = store.read(samples)
    assert isinstance(rows, torch.Tensor)  # a float16 store reads as dense rows
    return rows


def angle(a: torch.Tensor, b: torch.Tensor) -> float:
    cosine = torch.dot(a.flatten(), b.flatten()) / (a.norm() * b.norm())
    return math.degrees(math.acos(float(cosine.clamp(-1, 1))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--draws", default="4,8,12,24,48")
    parser.add_argument("--redraws", default="1,4,16,64")
    parser.add_argument("--batches", default="4,16,64", help="sequences per parameter gradient")
    parser.add_argument("--repeats", type=int, default=3, help="batches (or redraws) per figure")
    args = parser.parse_args()
    torch.set_num_threads(1)
    store = open_sequence_store(args.run / "train-float16.zarr")
    lm = load_causal_lm(f"hf:{args.run / 'ce-s0' / 'best'}")
    lm.model.eval()
    dataset = build_text_dataset(
        f"text:{args.run / 'students.jsonl'}:128", split="train", tokenizer=lm.tokenizer
    )
    order = np.random.default_rng(0).permutation(len(dataset)).tolist()
    schemes = ("multinomial", "systematic")

    # 1. logits
    samples = order[:16]
    batch = collate(dataset, samples)
    with torch.no_grad():
        q = torch.softmax(lm.logits(batch.input_ids, batch.attention_mask)[batch.mask].double(), 1)
    p = torch.softmax(dense_rows(store, samples).double(), dim=1)
    entropy = float(-(p * p.clamp_min(1e-300).log()).sum(1).mean())
    print(
        f"{len(p)} rows, V = {p.shape[1]}, teacher entropy {entropy:.2f} nats, "
        f"top-1 p {float(p.max(1).values.mean()):.3f}, sum p^2 {float((p * p).sum(1).mean()):.3f}"
    )
    dense = q - p
    for scheme in schemes:
        for num_draws in [int(s) for s in args.draws.split(",")]:
            counts = draw(p, num_draws, scheme, seed=0)
            single = q - counts / num_draws
            per_token = statistics.mean(angle(a, b) for a, b in zip(single, dense, strict=True))
            means = []
            for redraws in [int(r) for r in args.redraws.split(",")]:
                total = sum(draw(p, num_draws, scheme, seed=1 + i) for i in range(redraws))
                means.append(f"R={redraws}: {angle(q - total / (redraws * num_draws), dense):.1f}")
            print(
                f"logits {scheme} S={num_draws}: per token {per_token:.1f} deg, all rows "
                f"{angle(single, dense):.1f} deg, mean of R draws: {', '.join(means)}",
                flush=True,
            )

    # 2. parameters
    loss = TokenDistillationLoss(divergence="kd", temperature=1.0, alpha=1.0)
    parameters = [p for p in lm.model.parameters() if p.requires_grad]

    def gradient(teacher: torch.Tensor | SampledLogits, chosen: list[int]) -> torch.Tensor:
        batch = collate(dataset, chosen)
        logits = lm.logits(batch.input_ids, batch.attention_mask)
        soft = loss(logits, teacher, batch.targets, batch.mask)["soft"]
        grads = torch.autograd.grad(soft, parameters, allow_unused=True)
        return torch.cat(
            [
                (g if g is not None else torch.zeros_like(w)).flatten().double()
                for g, w in zip(grads, parameters, strict=True)
            ]
        )

    for size in [int(b) for b in args.batches.split(",")]:
        found: dict[str, list[float]] = {scheme: [] for scheme in schemes}
        for repeat in range(args.repeats):
            chosen = order[repeat * size : (repeat + 1) * size]
            rows = dense_rows(store, chosen)
            reference = gradient(rows, chosen)
            probs = torch.softmax(rows.double(), dim=1)
            for scheme in schemes:
                sampled = as_sampled(draw(probs, 12, scheme, seed=repeat), 12)
                found[scheme].append(angle(gradient(sampled, chosen), reference))
        print(
            f"parameters S=12, {size} sequences: "
            + ", ".join(f"{s} {statistics.mean(v):.1f} deg" for s, v in found.items()),
            flush=True,
        )


if __name__ == "__main__":
    main()
