"""counter-v1: the documented formulas, golden draws, purity under any chunking, independence."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from kdcache.augment import recipe as recipe_module
from kdcache.augment.counter import Draws
from kdcache.augment.recipe import STUDENT_STREAM, parse_recipe

MASK = (1 << 64) - 1
G = 0x9E3779B97F4A7C15


def mix(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def absorb(h: int, w: int) -> int:
    return mix(((h ^ (w & MASK)) + G) & MASK)


def reference_uniform(seed: int, stream: int, index: int, view: int, draw: int) -> float:
    """u(d) exactly as the module docstring and docs/augmentation.md write it, in Python ints."""
    row = absorb(absorb(absorb(absorb(0, seed), stream), index), view)
    return (mix((row + (draw + 1) * G) & MASK) >> 11) * 2.0**-53


@pytest.mark.parametrize(("seed", "stream"), [(0, 0), (3, STUDENT_STREAM), (2**64 - 1, 0), (-1, 7)])
def test_draws_follow_the_documented_formula(seed, stream):
    index = np.array([0, 1, 5, 1_279_999, 2**40])
    view = np.array([0, 0, 3, 15, 2])
    draws = Draws.of(seed=seed, stream=stream, index=index, view=view)
    for draw in (0, 1, 21, 1000):
        expected = [
            reference_uniform(seed, stream, int(i), int(v), draw)
            for i, v in zip(index, view, strict=True)
        ]
        assert draws.uniform(draw).tolist() == expected
    # at() shifts the draw numbers: an operation's block starts at its offset.
    assert draws.at(20).uniform(1).tolist() == draws.uniform(21).tolist()


def test_golden_draws_and_records():
    # Computed once with counter-v1; a change of generator must show up here (and be recorded
    # as a new augment.sampler name).
    draws = Draws.of(seed=0, stream=0, index=np.array([0, 1, 7]), view=np.array([0, 0, 3]))
    assert draws.uniform(0).tolist() == [
        0.47141042966848024,
        0.2380165699112271,
        0.1415867710518045,
    ]
    assert draws.uniform(5).tolist() == [
        0.005126893813512723,
        0.1348314001519868,
        0.6628302787349428,
    ]
    table = parse_recipe("rrc+flip+mixup:0.2").sample_table(
        seed=3, num_samples=6, views=4, size=(12, 10)
    )
    assert table[5, 3].tolist() == [0, 1, 6, 8, 0, 4, 0.9896926283836365, 5, 0, 6, 6, 1]
    assert table[0, 0].tolist() == [2, 0, 10, 9, 1, 4, 0.00047843490028753877, 1, 0, 11, 9, 1]
    table = parse_recipe("pad-crop:4+flip+cutmix:1").sample_table(
        seed=3, num_samples=6, views=4, size=(12, 10)
    )
    assert table[5, 3].tolist() == [3, 7, 1, 2, 0.5833333134651184, 1, 5, 10, 5, 7, 0, 0]
    assert table[0, 0].tolist() == [6, 3, 0, 5, 0.9666666388511658, 2, 0, 4, 1, 6, 8, 0]


@pytest.mark.parametrize(
    "spec", ["rrc+flip", "pad-crop:4+flip", "rrc+flip+mixup:0.2", "pad-crop:4+flip+cutmix:1"]
)
def test_any_chunking_and_any_single_record_give_the_same_bits(spec, monkeypatch):
    recipe = parse_recipe(spec)
    options: dict[str, Any] = dict(
        seed=11, num_samples=37, views=5, size=(9, 13), stream=STUDENT_STREAM
    )
    table = recipe.sample_table(**options)
    for chunk_rows in (1, 7, 64):  # a sample per chunk, chunks that split nothing evenly, one
        monkeypatch.setattr(recipe_module, "CHUNK_ROWS", chunk_rows)
        assert np.array_equal(recipe.sample_table(**options), table)
    for index in range(37):
        for view in range(5):
            record = recipe.sample(
                seed=11, index=index, view=view, num_samples=37, size=(9, 13), stream=STUDENT_STREAM
            )
            assert record.tobytes() == table[index, view].tobytes()
    sample_view = recipe.sample_view(
        seed=11, view=3, num_samples=37, size=(9, 13), stream=STUDENT_STREAM
    )
    assert sample_view.tobytes() == table[:, 3].tobytes()
    # The stream, the seed and the view all matter.
    assert not np.array_equal(recipe.sample_table(**{**options, "stream": 0}), table)
    assert not np.array_equal(recipe.sample_table(**{**options, "seed": 12}), table)
    assert not np.array_equal(table[:, 0], table[:, 1])


def test_neighbouring_samples_views_and_draws_are_uncorrelated():
    n = 200_000
    index = np.arange(n)
    first = Draws.of(seed=0, stream=0, index=index, view=np.zeros(n, np.int64))
    second = Draws.of(seed=0, stream=0, index=index, view=np.ones(n, np.int64))
    pairs = {
        "next sample": (first.uniform(0)[:-1], first.uniform(0)[1:]),
        "next view": (first.uniform(0), second.uniform(0)),
        "next draw": (first.uniform(0), first.uniform(1)),
        "next stream": (
            first.uniform(0),
            Draws.of(seed=0, stream=1, index=index, view=index * 0).uniform(0),
        ),
        "next seed": (
            first.uniform(0),
            Draws.of(seed=1, stream=0, index=index, view=index * 0).uniform(0),
        ),
    }
    for name, (a, b) in pairs.items():
        # Independent uniforms: the correlation's standard error is 1 / sqrt(n) ~ 0.0022.
        assert abs(np.corrcoef(a, b)[0, 1]) < 0.01, name
    u = first.uniform(0)
    assert abs(u.mean() - 0.5) < 0.003
    assert abs(u.var() - 1 / 12) < 0.002
    counts = np.bincount((u * 16).astype(int), minlength=16)
    assert counts.min() > 0.95 * n / 16
    assert counts.max() < 1.05 * n / 16
