"""Any training loop's dataset, yielding the store row of each input: :class:`IndexedDataset`.

The loop (timm's ``train.py``, a Lightning ``LightningModule``, your own) then reads each batch's
teacher rows from the store by those indices, in the main process and in one gather:
``store.read(index)``. Workers never open the store.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from kdcache.store.format.layout import StoreLike
from kdcache.store.read.reader import StoreReader
from kdcache.train.pairing import TeacherLogits


class IndexedDataset(Dataset):
    """``dataset``'s items as ``(input, target, index)``, ``index`` the store row of the input.

    The store (a path, URL, ``.zip`` or :class:`~kdcache.store.read.reader.StoreReader`) is
    opened once to check that it was dumped from ``dataset`` (size, classes, labels and, unless
    ``check_inputs=False``, inputs hashed at a few indices: pass False when ``dataset`` applies
    random train transforms), then let go. For a store of augmented views (``--augment``,
    ``--views V``) item ``i * V + v`` is view ``v`` of the ``i``-th sample, recreated from the
    stored view parameters, and ``index`` its row. ``indices`` keeps a subset of the samples.
    """

    def __init__(
        self,
        dataset: Dataset,
        store: StoreLike | StoreReader,
        *,
        indices: Sequence[int] | np.ndarray | None = None,
        check_inputs: bool = True,
    ) -> None:
        pairs = TeacherLogits(dataset, store, indices=indices, check_inputs=check_inputs)
        # The inputs without the store reader: what DataLoader workers receive.
        self.items = pairs.inputs

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, position: int) -> tuple[Any, Any, int]:
        return self.items[position]
