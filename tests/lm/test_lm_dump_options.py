"""Every option of `kdcache dump-teacher` for a language model: honoured, its effect seen, or
refused in one line that names it.

The options are read from the click command, so a new option fails here until it is given a
check below. The checks run the Python API on the tiny GPT-2 of lm_fixtures (wrapped by
lm_teachers, which notes what each forward pass saw); two real CLI runs cover the command line.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lm_teachers
import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, run_cli
from lm_fixtures import lm_files_fixture  # noqa: F401  (provides the lm_files fixture)

from kdcache.cli.commands import cli
from kdcache.config import DumpConfig
from kdcache.errors import KdcacheError, StoreExistsError
from kdcache.lm.dump import LMDumpResult, dump_lm
from kdcache.store.sequence import open_sequence_store

COMMAND = cli.commands["dump-teacher"]
#: Every dump-teacher option by its field name, with its flag.
FLAGS = {param.name: param.opts[0] for param in COMMAND.params if param.name is not None}

Run = Callable[..., LMDumpResult]


class Dump:
    """Dumps the tiny teacher into ``folder/t.zarr`` (or ``out``) with one option changed."""

    def __init__(self, folder: Path, corpus: Path) -> None:
        self.folder = folder
        self.base: dict[str, Any] = {
            "teacher": "lm_teachers:flaky",
            "dataset": f"text:{corpus}:16",
            "out": str(folder / "t.zarr"),
            "batch_size": 4,
        }

    def __call__(self, **changes: Any) -> LMDumpResult:
        lm_teachers.SEEN.clear()
        return dump_lm(DumpConfig(**{**self.base, **changes}))

    def store(self, out: str | None = None) -> Any:
        return open_sequence_store(out or self.base["out"])

    def seen(self, key: str) -> set[Any]:
        return {batch[key] for batch in lm_teachers.SEEN}


def check_teacher(dump: Dump) -> None:
    dump()
    assert dump.store().metadata.teacher["spec"] == "lm_teachers:flaky"


def check_dataset(dump: Dump) -> None:
    dump()
    assert dump.store().metadata.dataset["spec"] == dump.base["dataset"]


def check_split(dump: Dump) -> None:
    result = dump(split="test")
    store = dump.store()
    assert store.metadata.dataset["split"] == "test"
    assert store.num_sequences == result.num_samples < 10  # every 10th of 30 documents


def check_out(dump: Dump) -> None:
    out = str(dump.folder / "elsewhere.zarr")
    assert dump(out=out).out == out
    assert dump.store(out).metadata.complete


def check_encoding(dump: Dump) -> None:
    dump(encoding="topk:4")
    assert dump.store().metadata.encoding == "topk:4"


def check_batch_size(dump: Dump) -> None:
    result = dump(batch_size=5)
    sizes = [batch["batch_size"] for batch in lm_teachers.SEEN]
    assert sizes == [5] * (result.num_samples // 5) + [result.num_samples % 5]


def check_num_workers(dump: Dump) -> None:
    dump(num_workers=2)
    assert dump.seen("loader_workers") == {2}  # live worker processes beside each forward


def check_device(dump: Dump) -> None:
    dump(device="cpu")
    assert dump.seen("device") == {"cpu"}


def check_chunk_rows(dump: Dump) -> None:
    dump(chunk_rows=16)
    assert dump.store().metadata.chunk_rows == 16


def check_overwrite(dump: Dump) -> None:
    dump()
    before = dump.store().metadata.generation
    with pytest.raises(StoreExistsError, match="--overwrite"):
        dump()
    dump(overwrite=True)
    assert dump.store().metadata.generation != before


def check_resume(dump: Dump) -> None:
    lm_teachers.FAIL_AFTER = 3
    try:
        with pytest.raises(lm_teachers.Interrupted):
            dump(chunk_rows=16)
    finally:
        lm_teachers.FAIL_AFTER = None
    resumed = dump(chunk_rows=16, resume=True)
    assert 0 < resumed.rows_computed < resumed.num_tokens
    assert dump.store().metadata.complete


def check_writer_workers(dump: Dump) -> None:
    dump(writer_workers=3)
    assert max(dump.seen("writer_threads")) == 3


def check_fsync(dump: Dump, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = os.fsync

    def counting(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", counting)
    dump(fsync=False)
    assert not calls
    dump(out=str(dump.folder / "synced.zarr"))
    assert calls


def check_amp(dump: Dump) -> None:
    dump(amp="bf16")
    assert dump.store().metadata.teacher["amp"] == "bf16"
    assert dump.seen("autocast") == {True}


def check_compile(dump: Dump) -> None:
    # Compiling the tiny GPT-2 for CPU takes minutes: the teacher stops at its first batch,
    # which it saw being traced by torch.compile.
    lm_teachers.FAIL_AFTER = 0
    try:
        with pytest.raises(lm_teachers.Interrupted):
            dump(compile=True)
    finally:
        lm_teachers.FAIL_AFTER = None
    assert dump.seen("compiled") == {True}


def check_pack(dump: Dump) -> None:
    packed = dump(pack=True)
    assert dump.store().metadata.dataset["fingerprint"]["data"] == {"packed": True}
    assert packed.num_samples < dump(overwrite=True).num_samples  # documents joined, then cut


def check_train_on(dump: Dump) -> None:
    # The corpus is plain documents; chat data's assistant rows: tests/lm/test_lm_data.py.
    with pytest.raises(KdcacheError, match="--train-on assistant needs chat data"):
        dump(train_on="assistant")
    dump(train_on="all")
    assert "data" not in dump.store().metadata.dataset["fingerprint"]


def check_device_map(dump: Dump) -> None:
    # Transformers places the layers (here all on the CPU, the one device there is): the rows
    # are the unsharded teacher's, bit for bit. A module:function teacher cannot be placed.
    teacher = f"hf:{lm_teachers.FOLDER}"
    sharded = str(dump.folder / "sharded.zarr")
    dump(teacher=teacher, device_map="auto", out=sharded, encoding="float32")
    dump(teacher=teacher, encoding="float32")
    whole, placed = dump.store(), dump.store(sharded)
    samples = np.arange(whole.num_sequences)
    assert torch.equal(placed.read(samples), whole.read(samples))
    with pytest.raises(KdcacheError, match="--device-map needs an hf:PATH"):
        dump(device_map="auto", out=str(dump.folder / "refused.zarr"))


HONOURED: dict[str, Callable[..., None]] = {
    "teacher": check_teacher,
    "dataset": check_dataset,
    "split": check_split,
    "out": check_out,
    "encoding": check_encoding,
    "batch_size": check_batch_size,
    "num_workers": check_num_workers,
    "device": check_device,
    "chunk_rows": check_chunk_rows,
    "overwrite": check_overwrite,
    "resume": check_resume,
    "writer_workers": check_writer_workers,
    "fsync": check_fsync,
    "amp": check_amp,
    "compile": check_compile,
    "pack": check_pack,
    "train_on": check_train_on,
    "device_map": check_device_map,
}

#: Options that mean nothing for a language model, with a value that asks for them.
REFUSED: dict[str, dict[str, Any]] = {
    "weights": {"weights": __file__},
    # A config refuses views without a recipe; with one, the views are what is refused first.
    "views": {"views": 2, "augment": "flip"},
    "augment": {"augment": "flip"},
    "augment_seed": {"augment_seed": 1},
    "channels_last": {"channels_last": True},
    "inputs": {"inputs": "uint8"},
}


def test_every_option_is_either_honoured_or_refused():
    assert set(HONOURED).isdisjoint(REFUSED)
    assert set(FLAGS) == set(HONOURED) | set(REFUSED), (
        "give each dump-teacher option a check for language models above: "
        f"unchecked {sorted(set(FLAGS) - set(HONOURED) - set(REFUSED))}"
    )


@pytest.fixture(name="dump")
def dump_fixture(tmp_path, lm_files):
    lm_teachers.FOLDER = str(lm_files["teacher"])
    return Dump(tmp_path, lm_files["corpus"])


@pytest.mark.parametrize("name", sorted(HONOURED))
def test_honoured_option_has_its_effect(name, dump, monkeypatch):
    check = HONOURED[name]
    if name == "fsync":
        check(dump, monkeypatch)
    else:
        check(dump)


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_option_fails_in_one_line_naming_it_and_writes_nothing(name, dump):
    with pytest.raises(KdcacheError) as refused:
        dump(**REFUSED[name])
    message = str(refused.value)
    assert "\n" not in message
    assert FLAGS[name] in message
    assert not list(dump.folder.iterdir())


def test_the_command_line_honours_speed_options_and_refuses_image_ones(tmp_path, lm_files):
    store = tmp_path / "t.zarr"
    common = ["dump-teacher", "--teacher", f"hf:{lm_files['teacher']}"]
    common += ["--dataset", f"text:{lm_files['corpus']}:16", "--out", str(store)]
    refused = run_cli(*common, "--channels-last", check=False)
    assert_one_line_error(refused, "--channels-last")
    assert not store.exists()
    dumped = run_cli(*common, "--amp", "bf16", "--num-workers", "1", "--writer-workers", "2")
    assert "sequences" in dumped.stdout
    assert open_sequence_store(store).metadata.teacher["amp"] == "bf16"
