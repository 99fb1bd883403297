"""Augmentation recipes: parsing, parameters as a pure function of (seed, sample, view), replay."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from narrowing import present

from kdcache.augment.catalog import PRESETS, recipe_help
from kdcache.augment.recipe import OPERATIONS, parse_recipe
from kdcache.errors import SpecError

SIZE = (12, 10)


def images(n: int = 6) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.rand(3, *SIZE, generator=generator) for _ in range(n)]


@pytest.mark.parametrize(
    ("spec", "fields"),
    [
        ("rrc:scale=0.35-1,ratio=0.75-1.33+flip", 5),
        ("pad-crop:4+flip", 3),
        ("rrc+flip+mixup:0.2", 12),
        ("pad-crop:2+cutmix:1.0", 10),
    ],
)
def test_records_are_a_pure_function_of_seed_sample_and_view(spec, fields):
    recipe = parse_recipe(spec)
    assert len(recipe.fields) == fields
    table = recipe.sample_table(seed=3, num_samples=6, views=4, size=SIZE)
    assert table.shape == (6, 4, fields)
    assert table.dtype == np.float32
    # Any one record, drawn alone and in another order, equals the table's.
    for index, view in [(5, 3), (0, 0), (2, 1)]:
        alone = recipe.sample(seed=3, index=index, view=view, num_samples=6, size=SIZE)
        np.testing.assert_array_equal(alone, table[index, view])
    other_seed = recipe.sample_table(seed=4, num_samples=6, views=4, size=SIZE)
    assert not np.array_equal(table, other_seed)
    assert len({row.tobytes() for row in table.reshape(24, -1)}) > 12  # views do differ


@pytest.mark.parametrize(
    "spec",
    [
        "rrc:scale=0.2-1+flip",
        "pad-crop:3+flip",
        "rrc+cutmix:1",
        "rrc+flip+jitter:0.4,0.4,0.4,0.1+gray:0.5+blur:3,p=0.5",
        "deit",
        "timm-a1",
        "rrc+trivialaugment+erase:0.5",
        "pad-crop:2+autoaugment+mixup:0.2",
    ],
)
def test_same_record_same_pixels_bit_for_bit(spec):
    recipe = parse_recipe(spec)
    clean = images()
    table = recipe.sample_table(seed=1, num_samples=6, views=3, size=SIZE)
    for index in range(6):
        for view in range(3):
            record = table[index, view]
            partner = recipe.partner(record)
            other = None if partner is None else clean[partner]
            first = recipe.apply(clean[index], record, other)
            # A record that went through float32 storage and a fresh tensor give the same bits.
            again = recipe.apply(
                clean[index].clone(),
                np.frombuffer(record.tobytes(), dtype=np.float32),
                None if other is None else other.clone(),
            )
            assert first.shape == (3, *SIZE)
            assert torch.equal(first, again)


def test_rrc_crops_the_recorded_box_and_flip_mirrors():
    recipe = parse_recipe("rrc:scale=0.25-0.5,size=4+flip:1")
    image = torch.arange(3 * 12 * 10, dtype=torch.float32).reshape(3, 12, 10)
    record = recipe.sample(seed=0, index=0, view=0, num_samples=1, size=SIZE)
    top, left, height, width, flip = record.astype(int)
    assert flip == 1
    assert 0.25 * 120 <= height * width <= 0.5 * 120 + 12
    expected = torch.nn.functional.interpolate(
        image[None, :, top : top + height, left : left + width],
        size=(4, 4),
        mode="bilinear",
        antialias=True,
        align_corners=False,
    )[0].flip(-1)
    torch.testing.assert_close(recipe.apply(image, record), expected)


def test_pad_crop_shifts_the_image_inside_zero_padding():
    recipe = parse_recipe("pad-crop:2")
    image = torch.ones(1, 4, 4)
    view = recipe.apply(image, np.array([0, 4], dtype=np.float32))  # 2 up, 2 right
    assert view[:, :2].sum() == 0
    assert view[:, :, 2:].sum() == 0
    assert torch.equal(view[:, 2:, :2], torch.ones(1, 2, 2))


def test_mixup_pairs_with_another_sample_and_blends_by_lam():
    recipe = parse_recipe("mixup:0.4")
    clean = images()
    table = recipe.sample_table(seed=2, num_samples=6, views=5, size=SIZE)
    partners = table[:, :, 0].astype(int)
    assert ((partners >= 0) & (partners < 6)).all()
    assert (partners != np.arange(6)[:, None]).all()  # never mixed with itself
    record = table[1, 2]
    lam = recipe.lam(record)
    assert 0 <= lam <= 1
    assert lam == float(record[1])
    mixed = recipe.apply(clean[1], record, clean[present(recipe.partner(record))])
    lam_t = torch.tensor(lam, dtype=torch.float32)
    assert torch.equal(mixed, lam_t * clean[1] + (1 - lam_t) * clean[int(record[0])])


def test_cutmix_pastes_the_recorded_box_and_lam_is_its_complement():
    recipe = parse_recipe("cutmix:1")
    table = recipe.sample_table(seed=0, num_samples=4, views=8, size=SIZE)
    own, other = torch.zeros(1, *SIZE), torch.ones(1, *SIZE)
    for record in table.reshape(-1, len(recipe.fields)):
        mixed = recipe.apply(own, record, other)
        top, left, height, width = record[2:].astype(int)
        assert mixed.sum() == height * width
        assert torch.equal(
            mixed[:, top : top + height, left : left + width], other[:, :height, :width]
        )
        assert recipe.lam(record) == pytest.approx(1 - height * width / (SIZE[0] * SIZE[1]))


def test_canonical_spec_reparses_equal():
    recipe = parse_recipe("rrc+flip+mixup:0.2")
    assert recipe.spec == "rrc:scale=0.08-1,ratio=0.75-1.3333333+flip+mixup:0.2"
    assert parse_recipe(recipe.spec) == recipe
    assert parse_recipe("pad-crop:padding=4+flip:0.5").spec == "pad-crop:4+flip"
    assert parse_recipe("rrc+flip+rrc").fields[-4:] == (
        "crop_top_2",
        "crop_left_2",
        "crop_height_2",
        "crop_width_2",
    )


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "empty operation"),
        ("rrc+", "empty operation"),
        (
            "sharpen",
            "unknown operation 'sharpen'.*rrc, pad-crop, flip, jitter, .*, cutmix; presets: fkd",
        ),
        ("mixup:0.2+flip", "last operation"),
        ("mixup:0.2+cutmix:1", "last operation"),
        ("rrc:scale=1-0.5", "LOW <= HIGH"),
        ("rrc:scale=0-1", "0 < scale"),
        ("rrc:size=0", "size"),
        ("rrc:shape=3", "takes the arguments scale, ratio, size"),
        ("pad-crop:-1", r"padding must be an integer from 1 to 1,024 \(zero pixels"),
        ("pad-crop:100000", "padding must be an integer from 1 to 1,024"),
        ("pad-crop:²", "padding must be an integer from 1 to 1,024"),
        ("rrc:size=100000", "size='100000' .* must be an integer from 1 to 4,096"),
        ("rrc:size=99999999999999999999999", "must be an integer from 1 to 4,096"),
        ("rrc:size=²", "must be an integer from 1 to 4,096"),
        ("flip:1.5", r"\[0, 1\]"),
        ("mixup:0", "alpha 0.0"),
        ("mixup:x", "cannot read alpha='x'"),
        ("jitter:-0.1", "cannot read brightness='-0.1'"),
        ("jitter:saturation=0.1-0.4", "single strengths >= 0"),
        ("jitter:hue=0.6", "hue at most 0.5"),
        ("jitter:0", "at least one of them above 0"),
        ("gray:2", r"gray probability 2.0 .* \[0, 1\]"),
        ("blur:4", "blur kernel 4 .* must be odd"),
        ("blur:0", "blur kernel='0' .* integer from 1 to 1,023"),
        ("blur:3,sigma=0-1", "sigma=0-1 .* must be > 0"),
        ("erase:0.5,scale=0.1-1", "0 < scale < 1"),
        ("erase:0.5,value=noise", "cannot read value='noise'"),
        ("randaugment:0", "num_ops='0' .* from 1 to 16"),
        ("randaugment:2,31", "magnitude='31' .* from 0 to 30"),
        ("randaugment:2,9,bins=1", "bins='1' .* from 2 to 1,000"),
        ("trivialaugment:x", "bins='x'"),
        ("autoaugment:imagenet", "takes no arguments, got 'imagenet'"),
        ("deit:2", "preset 'deit' .* takes no arguments; write its operations"),
        ("deit+mixup:0.2+cutmix:1", "last operation"),
    ],
)
def test_malformed_recipes_say_what_is_wrong(spec, message):
    with pytest.raises(SpecError, match=message):
        parse_recipe(spec)


@pytest.mark.parametrize("name", OPERATIONS)
def test_every_registered_operation_parses_draws_and_applies(name):
    # A mixing operation comes last, after a geometric one.
    example = OPERATIONS[name].example
    recipe = parse_recipe(f"flip+{example}" if parse_recipe(example).mixes else example)
    assert parse_recipe(recipe.spec) == recipe
    clean = images()
    record = recipe.sample(seed=0, index=1, view=0, num_samples=6, size=SIZE)
    partner = recipe.partner(record)
    view = recipe.apply(clean[1], record, None if partner is None else clean[partner])
    assert view.shape == (3, *recipe.out_size(SIZE))
    assert view.dtype == torch.float32


@pytest.mark.parametrize("name", PRESETS)
def test_each_preset_stands_for_its_operations(name):
    recipe = parse_recipe(name)
    assert recipe == parse_recipe(PRESETS[name].spec)
    assert parse_recipe(recipe.spec) == recipe  # stores record the operations, not the name
    assert name not in OPERATIONS


def test_a_preset_is_one_element_of_a_recipe():
    recipe = parse_recipe("deit+mixup:0.8")
    assert recipe.spec == parse_recipe(PRESETS["deit"].spec + "+mixup:0.8").spec
    assert recipe.mixes
    assert parse_recipe("fkd").spec == "rrc:scale=0.08-1,ratio=0.75-1.3333333+flip"


def test_the_augment_help_names_every_operation_and_preset():
    help_text = recipe_help()
    assert all(name in help_text for name in [*OPERATIONS, *PRESETS])
