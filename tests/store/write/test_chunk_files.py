"""Row chunks written past zarr's event loop: the same files zarr writes, for every array."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import zarr
from narrowing import zarr_array

from kdcache import create_store
from kdcache.store.tools.verify import verify_store
from kdcache.store.write.chunk_files import ChunkFiles


def _logits(rows: int, classes: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    logits = rng.normal(0.0, 2.0, size=(rows, classes)).astype(np.float32)
    logits[np.arange(rows), rng.integers(0, classes, size=rows)] += 9.0
    return logits


@pytest.mark.parametrize("encoding", ["float16", "int8", "topk:5", "sampled:6", "viewset:8"])
def test_chunk_files_are_the_bytes_zarr_writes(tmp_path, encoding):
    # 4 views x 33 samples = 132 rows in chunks of 40: the last chunk is partial (zarr pads it).
    path = tmp_path / "fast.zarr"
    writer = create_store(
        path,
        num_samples=33,
        num_classes=50,
        encoding=encoding,
        chunk_rows=40,
        views=4,
        augment={"recipe": "flip", "seed": 3, "fields": ["flip"], "input_size": [8, 8]},
        view_params=(np.arange(132, dtype=np.float32) % 2).reshape(33, 4, 1),
    )
    assert isinstance(writer._files, ChunkFiles)  # the path under test, not zarr's
    writer.write(np.arange(132), _logits(132, 50))
    writer.finalize()
    assert verify_store(path).problems == ()

    # Every row chunk rewritten through zarr itself must give identical files.
    rewritten = tmp_path / "zarr.zarr"
    shutil.copytree(path, rewritten)
    group = zarr.open_group(rewritten, mode="r+")
    compared = 0
    for name in group.array_keys():
        array = zarr_array(group, name).with_config({"write_empty_chunks": True})
        values = array[:]
        shutil.rmtree(rewritten / name / "c")
        array[:] = values
        for file in sorted((path / name / "c").rglob("*")):
            if file.is_file():
                assert (rewritten / file.relative_to(path)).read_bytes() == file.read_bytes(), file
                compared += 1
    assert compared > 8
