"""Rows reduced with torch where the teacher ran encode to the bytes the host's encode gives
(run here on the CPU, the reduction forced through torch as on an accelerator); sampled:S rows
are drawn there, with the host's arrays."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdcache.logits.encodings import SampledEncoding, TopKEncoding, parse_encoding
from kdcache.logits.reduced import DrawnRows, ReducedRows, reduce_rows, reduces
from kdcache.logits.sampled import draw_rows
from kdcache.logits.sparse import as_numpy


@pytest.mark.parametrize(
    ("spec", "num_classes"), [("topk:8", 300), ("topk:32", 5000), ("topk:16:6", 5000)]
)
def test_reduced_rows_encode_to_the_host_encoding_bit_for_bit(spec, num_classes):
    rng = np.random.default_rng(7)
    logits = (
        -np.log1p(np.arange(num_classes)) + 3 * rng.standard_normal((40, num_classes))
    ).astype(np.float32)
    encoding = parse_encoding(spec, num_classes=num_classes)
    assert isinstance(encoding, TopKEncoding)
    measured = np.arange(40) % 8 == 0
    reduced = reduce_rows(torch.from_numpy(logits), encoding, measured=measured)
    assert isinstance(reduced, ReducedRows)
    from_device = encoding.encode_selected(
        as_numpy(reduced.values), as_numpy(reduced.indices), as_numpy(reduced.tail)
    )
    on_host = encoding.encode(logits)
    assert from_device.keys() == on_host.keys()
    for name, values in on_host.items():
        assert from_device[name].dtype == values.dtype, name
        np.testing.assert_array_equal(from_device[name], values, err_msg=name)
    np.testing.assert_array_equal(as_numpy(reduced.measured_logits), logits[measured])


def test_topk_and_sampled_rows_are_reduced_and_nothing_else():
    assert reduces(parse_encoding("topk:4:5"))
    assert reduces(parse_encoding("sampled:4"))
    assert reduces(parse_encoding("sampled:4:systematic"))
    assert not reduces(parse_encoding("float16"))
    with pytest.raises(TypeError, match="float16"):
        reduce_rows(torch.zeros(2, 10), parse_encoding("float16"), measured=np.ones(2, bool))
    with pytest.raises(TypeError, match="rows="):
        reduce_rows(torch.zeros(2, 10), parse_encoding("sampled:4"), measured=np.ones(2, bool))


def test_sampled_rows_are_drawn_at_their_store_rows_and_non_finite_ones_flagged():
    rng = np.random.default_rng(3)
    logits = torch.from_numpy(rng.standard_normal((6, 300)).astype(np.float32))
    logits[4, 7] = float("nan")
    encoding = parse_encoding("sampled:8:systematic", num_classes=300)
    rows = np.arange(50, 56)
    measured = rows % 4 == 0
    drawn = reduce_rows(logits, encoding, measured=measured, rows=rows)
    assert isinstance(drawn, DrawnRows)
    assert as_numpy(drawn.finite).tolist() == [True, True, True, True, False, True]
    finite = [0, 1, 2, 3, 5]
    classes, counts, _ = draw_rows(
        logits[finite], torch.from_numpy(rows[finite]), 8, scheme="systematic"
    )
    np.testing.assert_array_equal(as_numpy(drawn.classes)[finite], classes.numpy())
    np.testing.assert_array_equal(as_numpy(drawn.counts)[finite], counts.numpy())
    np.testing.assert_array_equal(as_numpy(drawn.measured_logits), logits.numpy()[measured])
    assert isinstance(encoding, SampledEncoding)
    encoded = encoding.encode_drawn(as_numpy(drawn.classes), as_numpy(drawn.counts))
    assert encoded["sample_indices"].dtype == np.uint16
    assert encoded["sample_counts"].dtype == np.uint8
