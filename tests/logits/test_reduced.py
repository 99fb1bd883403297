"""Rows reduced with torch where the teacher ran encode to the bytes the host's encode gives
(run here on the CPU, the reduction forced through torch as on an accelerator)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdcache.logits.encodings import TopKEncoding, parse_encoding
from kdcache.logits.reduced import reduce_rows, reduces
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
    from_device = encoding.encode_selected(
        as_numpy(reduced.values), as_numpy(reduced.indices), as_numpy(reduced.tail)
    )
    on_host = encoding.encode(logits)
    assert from_device.keys() == on_host.keys()
    for name, values in on_host.items():
        assert from_device[name].dtype == values.dtype, name
        np.testing.assert_array_equal(from_device[name], values, err_msg=name)
    np.testing.assert_array_equal(as_numpy(reduced.measured_logits), logits[measured])


def test_only_topk_rows_are_reduced():
    assert reduces(parse_encoding("topk:4:5"))
    assert not reduces(parse_encoding("sampled:4"))
    assert not reduces(parse_encoding("float16"))
    with pytest.raises(TypeError, match="sampled:4"):
        reduce_rows(torch.zeros(2, 10), parse_encoding("sampled:4"), measured=np.ones(2, bool))
