"""Encodings: parsing, layouts, and reconstruction error bounds on realistic logits."""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np
import pytest
import torch
from narrowing import present

from kdcache.errors import ConfigError, SpecError
from kdcache.logits.encodings import (
    ENCODING_CHOICES,
    ENCODINGS,
    Int8Encoding,
    SampledEncoding,
    TopKEncoding,
    index_dtype,
    parse_encoding,
)
from kdcache.logits.fidelity import kl_divergence


def peaked_logits(rows: int = 128, classes: int = 300, seed: int = 0) -> np.ndarray:
    """A confident teacher's logits: one class well above a few runners-up over a Gaussian tail."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=2.0, size=(rows, classes))
    head = rng.integers(classes, size=(rows, 4))
    np.put_along_axis(
        logits, head, np.array([14.0, 10.0, 9.0, 7.0]) + rng.normal(size=(rows, 4)), axis=1
    )
    return logits.astype(np.float32)


def fkd_best_kl(logits: np.ndarray, k: int, temperature: float) -> np.ndarray:
    """FKD's best case: the exact top-k probabilities at T, the rest of the mass spread
    uniformly."""
    log_p = torch.log_softmax(torch.from_numpy(logits).double() / temperature, dim=1)
    p = log_p.exp()
    top = p.topk(k, dim=1)
    rest = (1 - top.values.sum(dim=1, keepdim=True)) / (p.shape[1] - k)
    q = rest.expand_as(p).clone().scatter_(1, top.indices, top.values)
    return (p * (log_p - q.log())).sum(dim=1).numpy()


@pytest.mark.parametrize("name", ENCODINGS)
def test_every_registered_encoding_builds_from_its_example_and_round_trips(name):
    kind = ENCODINGS[name]
    logits = peaked_logits(rows=16, classes=50)
    encoding = parse_encoding(kind.example, num_classes=50)
    assert encoding.name == kind.example
    arrays = encoding.encode(logits)
    layout = encoding.layout(50)
    assert set(arrays) == set(layout)
    for array_name, (shape, dtype) in layout.items():
        assert arrays[array_name].shape == (16, *shape)
        assert arrays[array_name].dtype == dtype
    dense = encoding.decode(arrays, temperature=1.0)
    assert dense.shape == logits.shape
    assert dense.dtype == np.float32
    # Every encoding keeps a confident teacher's top class.
    assert np.array_equal(dense.argmax(axis=1), logits.argmax(axis=1))
    assert encoding.row_nbytes(50) == sum(a.nbytes for a in arrays.values()) // 16


def test_an_unknown_encoding_names_what_was_given_and_every_registered_form():
    with pytest.raises(SpecError, match="'bf16'.*" + ".*".join(map(re.escape, ENCODING_CHOICES))):
        parse_encoding("bf16")
    # A form without an argument takes none.
    with pytest.raises(SpecError, match="unknown encoding 'int8:4'"):
        parse_encoding("int8:4")
    for bad in ("topk", "topk:0", "topk:", "topk:-3", "topk:2.5"):
        with pytest.raises(SpecError, match="topk:K with an integer K >= 1"):
            parse_encoding(bad)


def test_index_dtype_is_the_smallest_that_holds_every_class():
    assert [index_dtype(c) for c in (10, 256, 257, 65536, 65537, 128_256)] == [
        np.uint8,
        np.uint8,
        np.uint16,
        np.uint16,
        np.uint32,
        np.uint32,
    ]


def test_layout_sizes_match_the_budget_at_1000_classes():
    assert parse_encoding("float16").row_nbytes(1000) == 2000
    assert Int8Encoding().row_nbytes(1000) == 1008
    assert TopKEncoding(20).row_nbytes(1000) == 96
    with pytest.raises(ConfigError, match=r"topk:10 keeps 10 classes.*only 10"):
        TopKEncoding(10).layout(10)


def test_float16_and_int8_error_bounds():
    logits = peaked_logits()
    half = parse_encoding("float16")
    np.testing.assert_allclose(half.decode(half.encode(logits)), logits, rtol=2**-11, atol=0)
    int8 = Int8Encoding()
    encoded = int8.encode(logits)
    error = np.abs(int8.decode(encoded) - logits)
    assert (error <= encoded["scale"][:, None] / 2 * (1 + 1e-4)).all()
    assert encoded["codes"].min() == 0
    assert encoded["codes"].max() == 255


def test_int8_encodes_a_constant_row_exactly():
    constant = np.full((2, 5), 3.5, dtype=np.float32)
    int8 = Int8Encoding()
    np.testing.assert_array_equal(int8.decode(int8.encode(constant)), constant)


def test_topk_keeps_the_true_top_classes_in_order():
    logits = peaked_logits()
    encoding = parse_encoding("topk:8", num_classes=300)
    sparse = present(encoding.sparse(encoding.encode(logits)))
    true_top = torch.from_numpy(logits).topk(8, dim=1)
    torch.testing.assert_close(sparse.indices, true_top.indices)
    # Offsets from the row max in float16: the error scales with the distance to the max.
    bound = (true_top.values[:, :1] - true_top.values).abs() * 2**-11 + 1e-6
    assert ((sparse.values - true_top.values).abs() <= bound).all()


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0, 8.0])
def test_topk_kl_matches_fkd_best_case_at_the_knots(temperature):
    logits = peaked_logits()
    encoding = parse_encoding("topk:8", num_classes=300)
    reconstruction = torch.from_numpy(
        encoding.decode(encoding.encode(logits), temperature=temperature)
    )
    kl = kl_divergence(torch.from_numpy(logits), reconstruction, temperature).mean().item()
    best = fkd_best_kl(logits, 8, temperature).mean()
    # Equal up to float16 rounding of the stored values: FKD's best case is the optimum of
    # "exact top-k, uniform tail", which kdcache reaches with the tail mass exact at T.
    assert kl == pytest.approx(best, rel=1e-3)


@pytest.mark.parametrize("temperature", [1.5, 3.0, 6.0, 16.0])
def test_topk_kl_between_the_knots_stays_close_to_fkd_best_case(temperature):
    logits = peaked_logits()
    encoding = parse_encoding("topk:8", num_classes=300)
    reconstruction = torch.from_numpy(
        encoding.decode(encoding.encode(logits), temperature=temperature)
    )
    kl = kl_divergence(torch.from_numpy(logits), reconstruction, temperature).mean().item()
    assert kl <= fkd_best_kl(logits, 8, temperature).mean() * 1.01


def test_topk_needs_the_class_count_to_decode():
    encoding = parse_encoding("topk:3")
    with pytest.raises(ConfigError, match="num_classes=C"):
        encoding.decode(encoding.encode(peaked_logits(4, 10)))


def test_every_sparse_encoding_names_the_class_count_it_needs_in_one_line():
    top, drawn = parse_encoding("topk:3"), parse_encoding("sampled:2")
    assert isinstance(top, TopKEncoding)
    assert isinstance(drawn, SampledEncoding)
    values = np.zeros((1, 3), np.float32)
    calls: dict[str, list[Callable[[], object]]] = {
        "to size its index array": [
            lambda: top.encode_selected(values, np.zeros((1, 3), np.int64), np.zeros((1, 6))),
            lambda: drawn.encode_drawn(np.zeros((1, 2), np.int64), np.ones((1, 2), np.uint8)),
        ],
        "to reconstruct rows": [
            lambda: drawn.sampled(drawn.encode(peaked_logits(1, 10))),
            lambda: top.sparse(top.encode(peaked_logits(1, 10))),
        ],
    }
    for purpose, actions in calls.items():
        for action in actions:
            with pytest.raises(ConfigError, match=f"number of classes {purpose};.*num_classes=C"):
                action()


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_topk_bits_codes_each_kept_value_within_its_bound(bits):
    logits = peaked_logits()
    logits[:3] = 0.0  # constant rows: every kept value is the maximum
    plain = parse_encoding("topk:16", num_classes=300)
    encoding = parse_encoding(f"topk:16:{bits}", num_classes=300)
    assert (encoding.name, encoding.row_nbytes(300)) == (f"topk:16:{bits}", 3 * 16 + 16)
    arrays = encoding.encode(logits)
    assert arrays["topk_codes"].max() <= (1 << bits) - 1
    assert (np.diff(arrays["topk_codes"].astype(int), axis=1) >= 0).all()  # descending values
    plain_arrays = plain.encode(logits)
    for name in ("topk_indices", "tail"):
        np.testing.assert_array_equal(arrays[name], plain_arrays[name])
    true_top = torch.from_numpy(logits).double().topk(16, dim=1)
    offsets = (true_top.values - true_top.values[:, :1]).numpy()
    sparse = present(encoding.sparse(arrays))
    decoded = (sparse.values.double() - sparse.values[:, :1].double()).numpy()
    # Every offset d from the max lies within (sqrt(depth |d|) + depth / 4L) / L of its code's
    # level, the depth being the row's K-th offset (to float16's next value above).
    levels = (1 << bits) - 1
    depth = arrays["topk_depth"].astype(np.float64)[:, None]
    assert (depth >= -offsets[:, -1:]).all()
    assert (depth <= -offsets[:, -1:] * (1 + 2**-10) + 1e-4).all()
    bound = (np.sqrt(depth * -offsets) + depth / (4 * levels)) / levels
    assert (np.abs(decoded - offsets) <= bound * (1 + 1e-4) + 1e-6).all()
    assert np.abs(decoded[:3]).max() == 0.0
    # The row max is stored to a quarter nat: a shift of the whole row.
    assert np.abs(sparse.values[:, 0].numpy() - logits.max(axis=1)).max() <= 0.125
    torch.testing.assert_close(sparse.indices, present(plain.sparse(plain_arrays)).indices)


def test_topk_bits_kl_stays_near_topk_at_8_bits():
    logits = peaked_logits()
    for temperature in (1.0, 4.0):
        kls = {}
        for spec in ("topk:8", "topk:8:8", "topk:8:3"):
            encoding = parse_encoding(spec, num_classes=300)
            decoded = encoding.decode(encoding.encode(logits), temperature=temperature)
            kls[spec] = kl_divergence(
                torch.from_numpy(logits), torch.from_numpy(decoded), temperature
            ).mean()
        assert kls["topk:8"] <= kls["topk:8:8"] <= kls["topk:8"] * 1.01 + 1e-5 < kls["topk:8:3"]


def test_topk_bits_spec_is_validated_in_one_line():
    coded, plain = parse_encoding("topk:32:8"), parse_encoding("topk:32")
    assert isinstance(coded, TopKEncoding)
    assert isinstance(plain, TopKEncoding)
    assert (coded.bits, plain.bits) == (8, None)
    for bad in ("topk:32:1", "topk:32:9", "topk:32:", "topk:0:8", "topk:32:8:1", "topk::8"):
        with pytest.raises(SpecError) as raised:
            parse_encoding(bad)
        message = str(raised.value)
        assert repr(bad) in message
        assert "topk:K:BITS with BITS in [2, 8]" in message
        assert "\n" not in message


def test_plain_topk_rows_are_stored_as_before_bits_existed():
    # topk:K keeps its layout and values exactly: stores written before topk:K:BITS read the same.
    logits = peaked_logits(rows=8, classes=300)
    encoding = parse_encoding("topk:5", num_classes=300)
    layout = encoding.layout(300)
    assert {name: (shape, str(dtype)) for name, (shape, dtype) in layout.items()} == {
        "row_max": ((), "float32"),
        "topk_offsets": ((5,), "float16"),
        "topk_indices": ((5,), "uint16"),
        "tail": ((6,), "float16"),
    }
    arrays = encoding.encode(logits)
    assert list(arrays) == list(layout)
    top = np.argsort(-logits, axis=1, kind="stable")[:, :5]
    values = np.take_along_axis(logits, top, axis=1)
    np.testing.assert_array_equal(arrays["topk_indices"], top)
    np.testing.assert_array_equal(arrays["row_max"], values[:, 0])
    np.testing.assert_array_equal(
        arrays["topk_offsets"], (values - values[:, :1]).astype(np.float16)
    )
    assert encoding.packed_arrays == ("topk_indices", "topk_offsets")


def test_sampled_systematic_spec_names_its_scheme_and_bad_schemes_are_refused():
    encoding = parse_encoding("sampled:12:systematic", num_classes=40)
    assert encoding.name == "sampled:12:systematic"
    assert parse_encoding("sampled:12").name == "sampled:12"
    for bad in ("sampled:12:stratified", "sampled:12:", "sampled::systematic"):
        with pytest.raises(SpecError, match="sampled:S:systematic"):
            parse_encoding(bad)
