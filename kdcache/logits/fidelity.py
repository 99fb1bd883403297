"""How faithfully an encoding keeps the teacher: KL to the true softmax and top-1 agreement.

For true logits z and the encoding's reconstruction z_hat (at the same temperature T, which a
sparse encoding needs), the fidelity is the mean over rows of

    KL(p_T(z) || p_T(z_hat)) = sum_c p_c (log p_c - log p_hat_c)      (nats, float64)

at T = 1, 2, 4, 8, and the fraction of rows whose arg-max class survives the encoding. The store
writer accumulates it over every row it writes, and the dump records it in the store metadata.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kdcache.errors import ConfigError
from kdcache.logits.encodings import Encoding
from kdcache.logits.sparse import SparseLogits

#: Temperatures at which the fidelity is measured and recorded.
FIDELITY_TEMPERATURES = (1.0, 2.0, 4.0, 8.0)
#: The writer measures the rows whose sample index is a multiple of this: measuring every row in
#: float64 at four temperatures would cost more than a fast teacher's forward pass, and a mean
#: over N/8 rows is precise enough to compare encodings.
SAMPLE_EVERY = 8


def kl_divergence(true_logits: Tensor, approx_logits: Tensor, temperature: float) -> Tensor:
    """KL(p_T(true) || p_T(approx)) per row, shape (B,), computed in float64."""
    log_p = torch.log_softmax(true_logits.double() / temperature, dim=1)  # no copy when float64
    log_q = torch.log_softmax(approx_logits.double() / temperature, dim=1)
    return torch.where(log_p > -torch.inf, log_p.exp() * (log_p - log_q), 0.0).sum(dim=1)


def sparse_kl_divergence(true_logits: Tensor, sparse: SparseLogits, temperature: float) -> Tensor:
    """As :func:`kl_divergence` against ``sparse.dense(temperature)``, without building it.

    With p the true softmax, KL = sum_c p_c log p_c - sum_{stored} p_i log p_hat_i
    - (1 - sum_{stored} p_i) * log(tail mass / n), every tail class having p_hat = mass / n.
    """
    log_p = torch.log_softmax(true_logits.double() / temperature, dim=1)
    p = log_p.exp()
    top_log, tail_log = sparse.to(log_p.device, torch.float64).log_probs(temperature)
    stored = p.gather(1, sparse.indices)
    cross = (stored * top_log).sum(dim=1)
    if sparse.num_tail:
        tail_mass = (1 - stored.sum(dim=1)).clamp_min(0.0)
        cross = cross + torch.where(
            tail_mass > 0, tail_mass * (tail_log - math.log(sparse.num_tail)), 0.0
        )
    return torch.special.xlogy(p, p).sum(dim=1) - cross


@dataclass(frozen=True, kw_only=True)
class Fidelity:
    """Mean KL (nats) at each temperature, top-1 agreement in [0, 1], over ``num_samples`` rows."""

    temperatures: tuple[float, ...]
    mean_kl: tuple[float, ...]
    top1_agreement: float
    num_samples: int

    def kl_at(self, temperature: float) -> float:
        """The recorded mean KL at ``temperature`` (one of :attr:`temperatures`)."""
        return self.mean_kl[self.temperatures.index(float(temperature))]

    def to_dict(self) -> dict[str, Any]:
        return {
            "temperatures": list(self.temperatures),
            "mean_kl": list(self.mean_kl),
            "top1_agreement": self.top1_agreement,
            "num_samples": self.num_samples,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Fidelity:
        return cls(
            temperatures=tuple(float(t) for t in data["temperatures"]),
            mean_kl=tuple(float(v) for v in data["mean_kl"]),
            top1_agreement=float(data["top1_agreement"]),
            num_samples=int(data["num_samples"]),
        )


class FidelityAccumulator:
    """Sums the fidelity of ``encoding`` over blocks of rows as they are encoded."""

    def __init__(
        self,
        encoding: Encoding,
        temperatures: tuple[float, ...] = FIDELITY_TEMPERATURES,
        *,
        sample_every: int = 1,
    ) -> None:
        self.encoding = encoding
        self.sample_every = sample_every
        self.temperatures = tuple(float(t) for t in temperatures)
        self._kl_sums = np.zeros(len(self.temperatures))
        self._agreeing = 0
        self._rows = 0

    def update(
        self,
        logits: np.ndarray,
        encoded: dict[str, np.ndarray],
        *,
        indices: np.ndarray | None = None,
        keep: np.ndarray | None = None,
    ) -> None:
        """Add rows of true float32 ``logits`` (B, C) and their ``encoded`` arrays.

        With ``indices`` (B,) only the rows whose sample index is a multiple of ``sample_every``
        count; ``keep`` (B,) bool drops further rows (those a resumed dump had already stored).
        """
        selected = (
            np.ones(len(logits), dtype=bool) if keep is None else np.asarray(keep, dtype=bool)
        )
        if indices is not None and self.sample_every > 1:
            selected &= np.asarray(indices) % self.sample_every == 0
        if not selected.all():
            logits = logits[selected]
            encoded = {name: values[selected] for name, values in encoded.items()}
        if len(logits) == 0:
            return
        true = torch.from_numpy(np.ascontiguousarray(logits)).double()
        sparse = self.encoding.sparse(encoded) if self.encoding.is_sparse else None
        if sparse is not None:
            self._agreeing += int((true.argmax(dim=1) == sparse.indices[:, 0]).sum())
        for position, temperature in enumerate(self.temperatures):
            if sparse is not None:
                self._kl_sums[position] += (
                    sparse_kl_divergence(true, sparse, temperature).sum().item()
                )
                continue
            approx = torch.from_numpy(self.encoding.decode(encoded, temperature=temperature))
            self._kl_sums[position] += kl_divergence(true, approx, temperature).sum().item()
            if position == 0:  # the arg-max of a reconstruction does not depend on T
                self._agreeing += int((true.argmax(dim=1) == approx.argmax(dim=1)).sum())
        self._rows += len(logits)

    def totals(self) -> tuple[list[float], int, int]:
        """The running sums (KL per temperature, agreeing rows, rows), to add up across
        processes."""
        return self._kl_sums.tolist(), self._agreeing, self._rows

    def add_totals(self, totals: tuple[list[float], int, int]) -> None:
        """Add another accumulator's :meth:`totals` (the rows another rank of a dump encoded)."""
        kl_sums, agreeing, rows = totals
        self._kl_sums += np.asarray(kl_sums, dtype=np.float64)
        self._agreeing += agreeing
        self._rows += rows

    def result(self) -> Fidelity | None:
        """The fidelity so far; ``None`` before any row was added."""
        if self._rows == 0:
            return None
        return Fidelity(
            temperatures=self.temperatures,
            mean_kl=tuple((self._kl_sums / self._rows).tolist()),
            top1_agreement=self._agreeing / self._rows,
            num_samples=self._rows,
        )


def measure_fidelity(
    logits: np.ndarray, encoding: Encoding, temperatures: tuple[float, ...] = FIDELITY_TEMPERATURES
) -> Fidelity:
    """The fidelity of ``encoding`` on float32 ``logits`` (B, C), without writing a store."""
    block = np.asarray(logits, dtype=np.float32)
    if block.ndim != 2 or len(block) == 0:
        raise ConfigError(f"measure_fidelity needs logits of shape (B >= 1, C), got {block.shape}")
    accumulator = FidelityAccumulator(encoding, temperatures)
    accumulator.update(block, encoding.encode(block))
    result = accumulator.result()
    assert result is not None  # at least one row was added
    return result
