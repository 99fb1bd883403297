"""FKD's soft labels (Shen & Xing, ECCV 2022; github.com/szq0214/FKD): their bytes per crop and
how close their reconstruction comes to a teacher's distribution at any temperature."""

from __future__ import annotations

import torch

#: FKD's bytes per crop: 4 float32 box coordinates, a 1-byte flip flag and a (2, 5) float32
#: tensor of top-5 class indices and probabilities (github.com/szq0214/FKD, FKD_SLG).
FKD_BYTES_PER_CROP = 4 * 4 + 1 + 2 * 5 * 4


def fkd_kl(logits: torch.Tensor, temperature: float, k: int = 5) -> dict[str, float]:
    """Mean KL(p_T || q) of FKD's top-k soft labels, per row of float32 ``logits`` (B, C).

    FKD stores the teacher's top-k softmax probabilities at T = 1 as float32, and rebuilds a
    target with the remaining mass spread uniformly over the other C - k classes
    (``marginal_smoothing_k5``). Its training loss divides only the student's logits by
    ``--temp`` (``criterion(output / args.temp, soft_label)`` in its train_FKD.py); the target
    stays the T = 1 distribution at every T (``as_trained``). Two other
    readings: ``tempered`` treats the rebuilt q as logits, q_T proportional to q^(1/T) (exact
    ratios among the k stored classes, but the tail's share is wrong away from T = 1); ``best``
    takes the top-k of p_T itself with the rest uniform, the least KL any top-k-plus-uniform
    target can have at that T, which FKD has only at the T it dumped at.
    """
    log_p = torch.log_softmax(logits.double() / temperature, dim=1)
    p = log_p.exp()
    classes = logits.shape[1]

    def spread(values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        rest = ((1 - values.sum(dim=1, keepdim=True)) / (classes - k)).clamp_min(1e-300)
        return rest.expand(-1, classes).clone().scatter_(1, indices, values)

    def kl(q: torch.Tensor) -> float:
        return torch.where(p > 0, p * (log_p - q.log()), 0.0).sum(dim=1).mean().item()

    top1 = torch.softmax(logits.double(), dim=1).topk(k, dim=1)
    # FKD saves float32 probabilities: round them as its files do.
    as_trained = spread(top1.values.float().double(), top1.indices)
    tempered = torch.softmax(as_trained.log() / temperature, dim=1)
    top_t = p.topk(k, dim=1)
    return {
        "as_trained": kl(as_trained),
        "tempered": kl(tempered),
        "best": kl(spread(top_t.values, top_t.indices)),
    }
