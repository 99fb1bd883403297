"""Which view each sample gets per epoch: even coverage, no repeats while V >= epochs."""

from __future__ import annotations

import numpy as np
import pytest
from narrowing import logit_feed

from kdcache import create_store, open_store
from kdcache.augment.order import ViewSampler, view_of


@pytest.mark.parametrize(("views", "epochs"), [(8, 5), (4, 4), (3, 7), (1, 3)])
def test_views_cover_evenly_and_repeat_only_after_all_were_used(views, epochs):
    samples = np.arange(50)
    used = np.stack(
        [view_of(samples, e, views=views, seed=4, num_samples=50) for e in range(epochs)]
    )
    assert ((used >= 0) & (used < views)).all()
    for sample_views in used.T:
        counts = np.bincount(sample_views, minlength=views)
        # Each view is used floor(E/V) or ceil(E/V) times: at most once while V >= E.
        assert counts.max() - counts.min() <= 1
        assert counts.max() == -(-epochs // views)
    if views > 1:
        assert len(set(used[0].tolist())) > 1  # samples do not march in lockstep


def test_the_sampler_yields_each_sample_once_per_epoch_at_its_view():
    sampler = ViewSampler(num_samples=20, views=4, seed=1)
    for epoch in range(3):
        rows = np.array(list(sampler))
        samples, views = rows // 4, rows % 4
        assert sorted(samples.tolist()) == list(range(20))
        np.testing.assert_array_equal(
            views, view_of(samples, epoch, views=4, seed=1, num_samples=20)
        )
    again = ViewSampler(num_samples=20, views=4, seed=1)
    np.testing.assert_array_equal(again.epoch_rows(2), sampler.epoch_rows(2))
    with_epoch = ViewSampler(num_samples=20, views=4, seed=1, with_epoch=True)
    list(with_epoch)
    np.testing.assert_array_equal(np.array(list(with_epoch)), sampler.epoch_rows(1) + 80)


def test_a_chunked_feed_keeps_its_chunk_order_with_views(tmp_path):
    writer = create_store(tmp_path / "s.zarr", num_samples=30, num_classes=3, views=4, chunk_rows=8)
    writer.write(np.arange(120), np.zeros((120, 3), dtype=np.float32))
    writer.finalize()
    feed = logit_feed(open_store(tmp_path / "s.zarr").feed)
    chunked = type(feed)(feed.reader, memory_budget=4 * feed.chunk_nbytes, mode="chunked")
    sampler = ViewSampler(num_samples=30, views=4, seed=0, feed=chunked)
    rows = sampler.epoch_rows(0)
    assert sorted((rows // 4).tolist()) == list(range(30))
    np.testing.assert_array_equal(rows % 4, view_of(rows // 4, 0, views=4, seed=0, num_samples=30))
    # The rows follow the feed's window order: a subsequence of its epoch order.
    order = chunked.epoch_order(0, seed=0)
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    assert (np.diff(rank[rows]) > 0).all()
