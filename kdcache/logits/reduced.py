"""Teacher rows reduced, on the teacher's device, to what a ``topk:K`` or ``sampled:S`` store
keeps of them.

A dump on a GPU used to copy every (n, V) block of float32 logits to the host, where the writer
threads selected the top K of each row and its tail statistics (about 0.3 ms a row on a CPU core
at V = 128k) or drew S classes from its softmax (about 0.8 ms): far more than a large teacher's
forward takes per token on the device. :func:`reduce_rows` does that work with torch where the
logits are, so only what the store keeps (K values, K ids and six statistics, or S classes and S
counts, a row) and the full rows the fidelity measures (every ``sample_every``-th) leave the
device; the writer then only converts and stores them
(:meth:`kdcache.store.write.writer.StoreWriter.write_reduced`).

``topk:K``: the top K and their ids are those of ``torch.topk`` on the host (the same float32
values); the tail statistics follow :func:`kdcache.logits.sparse.tail_statistics` step for step,
with sums in float64, but in torch's order of summation and exp: their float32 values may differ
from the host's in the last bits, and so, rarely, the float16 stored from them by one unit in the
last place. ``sampled:S``: the draws are :func:`kdcache.logits.sampled.draw_rows`, from the same
distribution as the host's but at uniforms fixed by each row's index, so a GPU dump's classes
are not a CPU dump's (nor are its logits). A dump on the CPU keeps the host path.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from kdcache.logits.encodings import Encoding, SampledEncoding, TopKEncoding
from kdcache.logits.sampled import draw_rows
from kdcache.logits.sparse import KNOT_TEMPERATURES

__all__ = ["DrawnRows", "ReducedRows", "reduce_rows", "reduces"]


@dataclass(frozen=True)
class ReducedRows:
    """A batch of rows as a ``topk:K`` encoding keeps them, before conversion to its dtypes.

    ``values`` (B, K) float32, the K largest logits, descending; ``indices`` (B, K) int64;
    ``tail`` (B, 6) float32, the :data:`~kdcache.logits.sparse.TAIL_STATS`; ``measured`` (B,)
    bool, the rows whose full float32 logits ``measured_logits`` (M, C) come along for the
    fidelity. Tensors on the device that reduced them, or numpy arrays on the host (``measured``
    is always on the host). ``num_classes``: the width C of the rows they were reduced from.
    """

    values: Tensor | np.ndarray
    indices: Tensor | np.ndarray
    tail: Tensor | np.ndarray
    measured: np.ndarray
    measured_logits: Tensor | np.ndarray
    num_classes: int

    def __len__(self) -> int:
        return len(self.values)


@dataclass(frozen=True)
class DrawnRows:
    """A batch of rows as a ``sampled:S`` encoding keeps them, before conversion to its dtypes.

    ``classes`` (B, S) int64, each row's distinct drawn classes ascending (padded with the last
    at count 0); ``counts`` (B, S) uint8; ``finite`` (B,) bool, the rows whose logits were all
    finite (the others were drawn from zeros and must be refused); ``measured``,
    ``measured_logits`` and ``num_classes`` as in :class:`ReducedRows`.
    """

    classes: Tensor | np.ndarray
    counts: Tensor | np.ndarray
    finite: Tensor | np.ndarray
    measured: np.ndarray
    measured_logits: Tensor | np.ndarray
    num_classes: int

    def __len__(self) -> int:
        return len(self.classes)


def reduces(encoding: Encoding) -> bool:
    """Whether :func:`reduce_rows` can reduce rows for ``encoding`` (``topk:K`` with any BITS,
    ``sampled:S`` with either scheme)."""
    return isinstance(encoding, TopKEncoding | SampledEncoding)


def reduce_rows(
    logits: Tensor, encoding: Encoding, *, measured: np.ndarray, rows: np.ndarray | None = None
) -> ReducedRows | DrawnRows:
    """``logits`` (B, C) reduced where they are to what ``encoding`` keeps (see the module).

    ``measured`` (B,) bool, on the host, names the rows whose full logits the writer's fidelity
    needs (picked by index, which needs no wait for the device, where a mask would). ``rows``
    (B,), the rows' indices in the store, fix a ``sampled:S`` row's draws (required for it).
    """
    block = logits.detach().float()
    measured_logits = block.index_select(
        0, torch.from_numpy(np.flatnonzero(measured)).to(block.device, non_blocking=True)
    )
    if isinstance(encoding, SampledEncoding):
        if rows is None:
            raise TypeError("sampled:S rows are drawn at their store rows: pass rows=")
        classes, counts, finite = draw_rows(
            block,
            torch.from_numpy(np.ascontiguousarray(rows, dtype=np.int64)),
            encoding.num_draws,
            scheme=encoding.scheme,
        )
        return DrawnRows(
            classes=classes,
            counts=counts,
            finite=finite,
            measured=np.asarray(measured, dtype=bool),
            measured_logits=measured_logits,
            num_classes=block.shape[1],
        )
    if not isinstance(encoding, TopKEncoding):
        raise TypeError(
            f"only topk:K and sampled:S rows are reduced on the device, got {encoding.name}"
        )
    values, indices = torch.topk(block, encoding.k, dim=1)
    return ReducedRows(
        values=values,
        indices=indices,
        tail=_tail_statistics(block, values, indices),
        measured=np.asarray(measured, dtype=bool),
        measured_logits=measured_logits,
        num_classes=block.shape[1],
    )


def _tail_statistics(block: Tensor, values: Tensor, indices: Tensor) -> Tensor:
    """:func:`kdcache.logits.sparse.tail_statistics` of ``block`` (B, C) in torch."""
    num_tail = block.shape[1] - indices.shape[1]
    work = block.scatter(1, indices, -torch.inf)
    top = work.amax(dim=1)
    mean = block.sum(dim=1, dtype=torch.float64) - values.sum(dim=1, dtype=torch.float64)
    work -= top[:, None]
    sums: dict[float, Tensor] = {}
    power_t = None
    for t in sorted(KNOT_TEMPERATURES, reverse=True):
        if power_t == 2 * t:
            work.square_()
        else:
            work.div_(t).exp_()
        power_t = t
        sums[t] = work.sum(dim=1, dtype=torch.float64)
    top64 = top.double()
    knots = [top64 + t * torch.log(sums[t] / num_tail) for t in KNOT_TEMPERATURES]
    return torch.stack([top64, mean / num_tail, *knots], dim=1).float()
