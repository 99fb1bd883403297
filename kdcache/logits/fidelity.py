"""How faithfully an encoding keeps the teacher: KL to the true softmax and top-1 agreement.

For true logits z and the encoding's reconstruction z_hat (at the same temperature T, which a
sparse encoding needs), the fidelity is the mean over rows of

    KL(p_T(z) || p_T(z_hat)) = sum_c p_c (log p_c - log p_hat_c)      (nats, float64)

at T = 1, 2, 4, 8, and the fraction of rows whose arg-max class survives the encoding. The store
writer accumulates it over every row it writes, and the dump records it in the store metadata.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kdcache.errors import ConfigError
from kdcache.logits.encodings import Encoding
from kdcache.logits.sparse import SparseLogits, as_numpy

#: Temperatures at which the fidelity is measured and recorded.
FIDELITY_TEMPERATURES = (1.0, 2.0, 4.0, 8.0)
#: The writer measures the rows whose index is a multiple of :func:`sample_stride`: at least
#: every 8th row, and no more than about this many rows in all. Measuring every row in float64 at
#: four temperatures would cost more than encoding it, and a mean over 65,536 rows is precise
#: enough to compare encodings; the cap keeps the cost of a 20M-row dump that of a 0.5M-row one.
SAMPLE_EVERY = 8
MAX_MEASURED_ROWS = 1 << 16


#: Selected rows wait until they hold this many logits, then are measured in one go.
MEASURE_BLOCK_ELEMENTS = 1 << 20


def sample_stride(num_rows: int) -> int:
    """Measure every ``sample_stride(num_rows)``-th row of a store of ``num_rows`` rows."""
    return max(SAMPLE_EVERY, -(-num_rows // MAX_MEASURED_ROWS))


#: Rows measured at a time: a block's float64 temporaries stay in the core's cache.
KL_BLOCK_ELEMENTS = 1 << 16


def _softmax_parts(logits: np.ndarray, temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """p_T and log p_T per row in float64 with one exp per element: p is exp(x - max) over its
    sum, where ``exp(log_softmax)`` took a second exp. numpy, like the whole fidelity: one core
    per call with the GIL released, so the writer's threads measure in parallel instead of
    queueing on torch's pool."""
    log_p = logits.astype(np.float64) / temperature
    log_p -= log_p.max(axis=1, keepdims=True)
    p = np.exp(log_p)
    total = p.sum(axis=1, keepdims=True)
    p /= total
    log_p -= np.log(total)
    return p, log_p


def _blocks(num_rows: int, num_classes: int) -> list[slice]:
    step = max(1, KL_BLOCK_ELEMENTS // max(1, num_classes))
    return [slice(start, start + step) for start in range(0, num_rows, step)]


def kl_divergence(
    true_logits: Tensor | np.ndarray, approx_logits: Tensor | np.ndarray, temperature: float
) -> Tensor:
    """KL(p_T(true) || p_T(approx)) per row, shape (B,), computed in float64."""
    true, approx = as_numpy(true_logits), as_numpy(approx_logits)
    out = np.empty(len(true), dtype=np.float64)
    for rows in _blocks(*true.shape):
        p, log_p = _softmax_parts(true[rows], temperature)
        _, log_q = _softmax_parts(approx[rows], temperature)
        log_p -= log_q
        # A class without mass adds nothing (where log q is -inf too, 0 * nan would be nan).
        out[rows] = np.where(p > 0, p * log_p, 0.0).sum(axis=1)
    return torch.from_numpy(out)


def sparse_kl_divergence(
    true_logits: Tensor | np.ndarray, sparse: SparseLogits, temperature: float
) -> Tensor:
    """As :func:`kl_divergence` against ``sparse.dense(temperature)``, without building it.

    With p the true softmax, KL = sum_c p_c log p_c - sum_{stored} p_i log p_hat_i
    - (1 - sum_{stored} p_i) * log(tail mass / n), every tail class having p_hat = mass / n.
    """
    true = as_numpy(true_logits)
    top_log, tail_log = (
        as_numpy(part) for part in sparse.to("cpu", torch.float64).log_probs(temperature)
    )
    indices = as_numpy(sparse.indices)
    out = np.empty(len(true), dtype=np.float64)
    for rows in _blocks(*true.shape):
        p, log_p = _softmax_parts(true[rows], temperature)
        stored = np.take_along_axis(p, indices[rows], axis=1)
        cross = (stored * top_log[rows]).sum(axis=1)
        if sparse.num_tail:
            tail_mass = np.clip(1 - stored.sum(axis=1), 0.0, None)
            with np.errstate(divide="ignore", invalid="ignore"):  # no tail mass: no term
                tail_term = tail_mass * (tail_log[rows] - math.log(sparse.num_tail))
            cross = cross + np.where(tail_mass > 0, tail_term, 0.0)
        with np.errstate(invalid="ignore"):  # 0 * -inf for a class without mass: dropped
            entropy = np.where(p > 0, p * log_p, 0.0).sum(axis=1)
        out[rows] = entropy - cross
    return torch.from_numpy(out)


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
    """Sums the fidelity of ``encoding`` over blocks of rows as they are encoded.

    Safe to update from several threads. It keeps every measured row's KL and sums them
    exactly (``math.fsum``; at most ~65k rows in a store, see :func:`sample_stride`), so the
    result depends neither on the order in which blocks arrive nor on how the rows were split
    between threads or processes (:meth:`parts`, :meth:`add_parts`).
    """

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
        self._lock = threading.Lock()
        self._kl_rows: list[list[np.ndarray]] = [[] for _ in self.temperatures]
        #: Rows selected but not measured yet (true logits, encoded arrays).
        self._pending: list[tuple[np.ndarray, dict[str, np.ndarray]]] = []
        self._pending_elements = 0
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
        with self._lock:
            self._pending.append((np.array(logits), encoded))
            self._pending_elements += logits.size
            if self._pending_elements < MEASURE_BLOCK_ELEMENTS:
                return
            blocks, self._pending, self._pending_elements = self._pending, [], 0
        self._measure(blocks)

    def _measure(self, blocks: list[tuple[np.ndarray, dict[str, np.ndarray]]]) -> None:
        """KL and agreement of the rows of ``blocks``, measured together: the per-call cost of
        the small sparse-tail operations is then paid once per ~1M logits, not once per batch
        (each row's KL does not depend on the rows measured with it)."""
        if not blocks:
            return
        true = np.concatenate([logits for logits, _ in blocks])
        encoded = {
            name: np.concatenate([arrays[name] for _, arrays in blocks]) for name in blocks[0][1]
        }
        sparse = self.encoding.sparse(encoded) if self.encoding.is_sparse else None
        agreeing = 0
        kls = []
        if sparse is not None:
            agreeing = int((true.argmax(axis=1) == as_numpy(sparse.indices[:, 0])).sum())
        for position, temperature in enumerate(self.temperatures):
            if sparse is not None:
                kls.append(sparse_kl_divergence(true, sparse, temperature).numpy())
                continue
            approx = self.encoding.decode(encoded, temperature=temperature)
            kls.append(kl_divergence(true, approx, temperature).numpy())
            if position == 0:  # the arg-max of a reconstruction does not depend on T
                agreeing = int((true.argmax(axis=1) == approx.argmax(axis=1)).sum())
        self.add_parts((kls, agreeing, len(true)))

    def parts(self) -> tuple[list[np.ndarray], int, int]:
        """Every measured row's KL (one array per temperature), agreeing rows, rows: what
        :meth:`add_parts` of another accumulator takes (another rank's rows)."""
        with self._lock:
            blocks, self._pending, self._pending_elements = self._pending, [], 0
        self._measure(blocks)
        with self._lock:
            kls = [np.concatenate(rows) if rows else np.zeros(0) for rows in self._kl_rows]
            return kls, self._agreeing, self._rows

    def add_parts(self, parts: tuple[list[np.ndarray], int, int]) -> None:
        """Add rows measured elsewhere (:meth:`parts`)."""
        kls, agreeing, rows = parts
        with self._lock:
            for kept, values in zip(self._kl_rows, kls, strict=True):
                kept.append(np.asarray(values, dtype=np.float64).reshape(-1))
            self._agreeing += agreeing
            self._rows += rows

    def result(self) -> Fidelity | None:
        """The fidelity so far; ``None`` before any row was added."""
        kls, agreeing, rows = self.parts()
        if rows == 0:
            return None
        return Fidelity(
            temperatures=self.temperatures,
            mean_kl=tuple(math.fsum(values.tolist()) / rows for values in kls),
            top1_agreement=agreeing / rows,
            num_samples=rows,
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
