"""distill --cache a --cache b: several teachers combined inside the loss, as `kdcache merge`
combines them into one store."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, run_cli
from narrowing import present

from kdcache import DistillConfig, create_store, open_store
from kdcache.errors import ConfigError, StoreMismatchError
from kdcache.store.tools.merge import merge_stores
from kdcache.train.loop import distill

COMMON: dict[str, Any] = dict(
    student="mlp:16", epochs=2, batch_size=64, seed=3, device="cpu", temperature=3.0, alpha=0.7
)


def second_teacher(source: Path, out: Path, *, scale: float = 0.6, seed: int = 1) -> Path:
    """A store of another teacher on the same dataset: the first one's logits rescaled and
    perturbed, with its dataset record and labels."""
    reader = open_store(source)
    logits = reader.read_dense(np.arange(reader.num_samples)).numpy()
    noise = np.random.default_rng(seed).normal(size=logits.shape).astype(np.float32)
    writer = create_store(
        out,
        num_samples=reader.num_samples,
        num_classes=reader.num_classes,
        encoding="float32",
        labels=reader.labels,
        teacher={"spec": "other", "weights_sha256": None},
        dataset=reader.metadata.dataset,
    )
    writer.write(np.arange(reader.num_samples), logits * scale + 2.0 * noise)
    writer.finalize()
    return out


def load_state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


def same_student(a: Path, b: Path) -> bool:
    left, right = load_state(a / "last.pt"), load_state(b / "last.pt")
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


def test_a_float32_mean_merge_and_the_two_store_run_give_the_same_student(tmp_path, digits_store):
    other = second_teacher(digits_store, tmp_path / "other.zarr")
    merged = tmp_path / "merged.zarr"
    merge_stores([digits_store, other], merged, mode="mean", weights=[3, 1], encoding="float32")
    distill(DistillConfig(cache=str(merged), out=str(tmp_path / "merged"), **COMMON))
    pair = (str(digits_store), str(other))
    distill(DistillConfig(cache=pair, teacher_weights=(3, 1), out=str(tmp_path / "pair"), **COMMON))
    assert same_student(tmp_path / "merged", tmp_path / "pair")
    record = json.loads((tmp_path / "pair/config.json").read_text())
    assert record["cache"] == list(pair)
    ensemble = record["resolved"]["ensemble"]
    assert (ensemble["mode"], ensemble["weights"]) == ("mean", [0.75, 0.25])
    assert [s["content_sha256"] for s in ensemble["stores"]] == [
        open_store(path).content_digest() for path in pair
    ]
    # Other weights give another student: the comparison can fail.
    distill(DistillConfig(cache=pair, out=str(tmp_path / "equal"), **COMMON))
    assert not same_student(tmp_path / "pair", tmp_path / "equal")


def test_a_mixture_merge_and_the_mixture_run_give_the_same_student(tmp_path, digits_store):
    other = second_teacher(digits_store, tmp_path / "other.zarr")
    merged = tmp_path / "mixture.zarr"
    merge_stores([digits_store, other], merged, mode="mixture", temperature=3.0, encoding="float32")
    distill(DistillConfig(cache=str(merged), out=str(tmp_path / "merged"), **COMMON))
    distill(
        DistillConfig(
            cache=(str(digits_store), str(other)),
            teacher_mix="mixture",
            out=str(tmp_path / "pair"),
            **COMMON,
        )
    )
    assert same_student(tmp_path / "merged", tmp_path / "pair")


def test_a_mixture_store_softened_at_another_temperature_warns(tmp_path, digits_store, caplog):
    other = second_teacher(digits_store, tmp_path / "other.zarr")
    merged = tmp_path / "mixture.zarr"
    merge_stores([digits_store, other], merged, mode="mixture", temperature=4.0)
    options = {**COMMON, "epochs": 1}
    with caplog.at_level("WARNING", logger="kdcache"):
        distill(DistillConfig(cache=str(merged), out=str(tmp_path / "at3"), **options))
    assert any("mixture of teachers at T=4" in r.getMessage() for r in caplog.records)


def test_stores_of_other_rows_are_refused_before_the_run_folder(tmp_path, digits_store):
    reader = open_store(digits_store)
    shifted = tmp_path / "shifted.zarr"
    writer = create_store(
        shifted,
        num_samples=reader.num_samples,
        num_classes=reader.num_classes,
        encoding="float32",
        labels=(present(reader.labels) + 1) % reader.num_classes,
        dataset=reader.metadata.dataset,
    )
    writer.write(np.arange(reader.num_samples), reader.read_dense(np.arange(reader.num_samples)))
    writer.finalize()
    with pytest.raises(StoreMismatchError, match=r"differs from .* in its labels"):
        distill(
            DistillConfig(
                cache=(str(digits_store), str(shifted)), out=str(tmp_path / "r"), **COMMON
            )
        )
    assert not (tmp_path / "r").exists()
    result = run_cli(
        "distill",
        "--cache",
        str(digits_store),
        "--cache",
        str(shifted),
        "--student",
        "mlp:8",
        "--out",
        str(tmp_path / "cli"),
        "--device",
        "cpu",
        check=False,
    )
    assert_one_line_error(result, "in its labels")
    assert not (tmp_path / "cli").exists()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"cache": "a.zarr", "teacher_weights": (1, 1)}, "give two or more --cache"),
        ({"cache": "a.zarr", "teacher_mix": "mixture"}, "give two or more --cache"),
        ({"cache": ("a.zarr", "b.zarr"), "teacher_weights": (1,)}, "1 weights for 2"),
        ({"cache": ("a.zarr", "b.zarr"), "teacher_weights": (0, 0)}, "not all 0"),
        ({"cache": ("a.zarr", "b.zarr"), "teacher_mix": "median"}, "valid choices: mean"),
    ],
)
def test_bad_teacher_options_are_refused(options, message):
    with pytest.raises(ConfigError, match=message):
        DistillConfig(student="mlp", out="o", **options)


def test_one_cache_given_as_a_list_is_the_plain_single_store_run():
    config = DistillConfig(student="mlp", out="o", cache=("a.zarr",))
    assert (config.cache, config.stores) == ("a.zarr", ("a.zarr",))
