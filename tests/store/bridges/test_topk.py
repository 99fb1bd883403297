"""What every import shares: dense rows from top-k values, and a new store verified before it is
marked complete."""

from __future__ import annotations

import numpy as np
import pytest

from kdcache.errors import StoreCorruptError
from kdcache.logits.encodings import parse_encoding
from kdcache.store.bridges.topk import FILL_CAP, dense_from_top_k, write_new_store


def softmax(logits: np.ndarray) -> np.ndarray:
    exp = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return exp / exp.sum(axis=-1, keepdims=True)


def test_the_missing_mass_stays_below_every_stored_class():
    # k = 5 of C = 10 holding 0.5: an even spread would give every other class 0.1 > 0.02.
    stored = np.array([[0.2, 0.15, 0.1, 0.03, 0.02]])
    classes = np.array([[7, 2, 9, 0, 4]])
    dense = dense_from_top_k(np.log(stored), classes, 10)
    probs = softmax(dense.astype(np.float64))[0]
    others = np.setdiff1d(np.arange(10), classes[0])
    np.testing.assert_allclose(probs[others], probs[4] * FILL_CAP, rtol=1e-5)
    # softmax renormalises: the stored classes keep their ratios.
    np.testing.assert_allclose(probs[classes[0]] / probs[7], stored[0] / 0.2, rtol=1e-5)
    encoding = parse_encoding("topk:5", num_classes=10)
    kept = encoding.encode(dense)["topk_indices"]
    assert sorted(kept[0].tolist()) == sorted(classes[0].tolist())
    # Where the even share stays below them, the stored values are kept exactly.
    roomy = dense_from_top_k(np.log(stored), classes, 1000)
    np.testing.assert_allclose(softmax(roomy.astype(np.float64))[0, classes[0]], stored[0], 1e-5)


def test_a_fresh_store_damaged_before_it_is_finalized_is_refused_and_removed(tmp_path):
    out = tmp_path / "new.zarr"

    def rows():
        yield np.arange(4), np.zeros((4, 6), np.float32) + np.arange(6)
        # Every row written: a labels chunk lost now must keep the store from being complete.
        (out / "labels" / "c" / "0").unlink()

    with pytest.raises(StoreCorruptError, match="failed verification"):
        write_new_store(
            out, rows(), num_samples=4, num_classes=6, encoding="float16", labels=[0, 1, 2, 3]
        )
    assert not out.exists()
