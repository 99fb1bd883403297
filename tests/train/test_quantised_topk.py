"""An image store whose kept values are BITS-bit codes (topk:K:BITS): dumped, verified, inspected
and distilled like a topk:K store, its rows the same classes within the codes' error."""

from __future__ import annotations

import numpy as np
import torch

from kdcache import DistillConfig, DumpConfig
from kdcache.dump.teacher import dump_teacher
from kdcache.store.read.reader import open_store
from kdcache.store.tools.report import inspect_store
from kdcache.store.tools.verify import verify_store
from kdcache.train.loop import distill


def test_a_quantised_topk_image_store_dumps_and_distills(tmp_path, digits_teacher, digits_store):
    store = tmp_path / "top4-8.zarr"
    dump_teacher(
        DumpConfig(
            teacher="cnn:8",
            weights=str(digits_teacher),
            out=str(store),
            encoding="topk:4:8",
            device="cpu",
        )
    )
    assert verify_store(store).ok
    assert inspect_store(store).encoding == "topk:4:8"
    coded, dense = open_store(store), open_store(digits_store)
    rows = np.arange(64)
    sparse = coded.read_sparse(rows)
    truth = dense.read_dense(rows).topk(4, dim=1)
    torch.testing.assert_close(sparse.indices, truth.indices)
    offsets = [values - values[:, :1] for values in (sparse.values, truth.values)]
    assert (offsets[0] - offsets[1]).abs().max() < 0.1  # depth / 255 at most, plus float16
    result = distill(
        DistillConfig(
            student="mlp:16",
            cache=str(store),
            epochs=1,
            temperature=2.0,
            out=str(tmp_path / "run"),
        )
    )
    assert 0 <= result.final <= 100
