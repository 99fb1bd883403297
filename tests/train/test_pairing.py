"""TeacherLogits: your own training loop over a dataset paired with its store."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import REPO_ROOT
from torch.utils.data import DataLoader, TensorDataset

from kdcache import DumpConfig, LogitsDistillationLoss, SparseLogits, TeacherLogits, open_store
from kdcache.data.datasets import build_dataset
from kdcache.dump.teacher import dump_teacher
from kdcache.errors import ConfigError, StoreMismatchError
from kdcache.train.loop import evaluate


def readme_loop() -> str:
    """The plain PyTorch loop the README shows, verbatim."""
    readme = (REPO_ROOT / "README.md").read_text()
    block = readme.split("<!-- byo-loop -->\n```python\n")[1].split("```")[0]
    return block


@pytest.fixture(scope="module")
def topk_digits_store(tmp_path_factory, digits_teacher):
    out = tmp_path_factory.mktemp("pairing") / "teacher.zarr"
    dump_teacher(
        DumpConfig(
            teacher="cnn:8",
            weights=str(digits_teacher),
            out=str(out),
            encoding="topk:3",
            device="cpu",
        )
    )
    return out


def test_the_readme_loop_runs_as_written_and_distils(tmp_path, topk_digits_store, monkeypatch):
    code = readme_loop()
    assert len(code.strip().splitlines()) < 25
    os.symlink(topk_digits_store, tmp_path / "teacher.zarr")
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    accuracy, _ = evaluate(
        namespace["student"],
        build_dataset("digits", split="test"),
        batch_size=256,
        device=torch.device("cpu"),
    )
    assert accuracy > 80.0  # 5 epochs of the mlp against a cnn:8 teacher through topk:3


def test_items_and_batches_carry_the_stores_rows(topk_digits_store):
    train_set = build_dataset("digits", split="train")
    store = open_store(topk_digits_store)
    pairs = TeacherLogits(train_set, store)
    x, y, teacher = pairs[7]
    assert torch.equal(x, train_set[7][0]) and y == train_set[7][1]
    assert isinstance(teacher, SparseLogits) and teacher.shape == (1, 10)

    reads = []
    read = store.read
    store.read = lambda rows: reads.append(list(rows)) or read(rows)  # count the reads
    loader = DataLoader(pairs, batch_size=32, shuffle=True, collate_fn=pairs.collate)
    batches = list(loader)
    assert len(reads) == len(batches) == len(loader)  # one store read per batch
    assert sorted(sum(reads, [])) == list(range(len(train_set)))
    x, y, teacher = batches[0]
    assert x.shape == (32, 1, 8, 8) and y.shape == (32,)
    assert isinstance(teacher, SparseLogits) and teacher.shape == (32, 10)
    want = read(reads[0])
    torch.testing.assert_close(teacher.values, want.values)
    torch.testing.assert_close(teacher.indices, want.indices)
    # items gathered one by one collate to the same batch as one read
    _, _, one_by_one = pairs.collate([pairs[row] for row in reads[0]])
    torch.testing.assert_close(one_by_one.values, want.values)
    torch.testing.assert_close(one_by_one.tail, want.tail)
    student = torch.randn(32, 10)
    loss = LogitsDistillationLoss(temperature=3.0)
    torch.testing.assert_close(loss(student, teacher, y)["total"], loss(student, want, y)["total"])


def test_a_dense_store_batches_into_one_tensor_and_indices_keep_a_subset(digits_store):
    pairs = TeacherLogits(
        build_dataset("digits", split="train"), digits_store, indices=[5, 9, 100, 3]
    )
    x, y, teacher = next(iter(DataLoader(pairs, batch_size=4, collate_fn=pairs.collate)))
    assert len(pairs) == 4
    torch.testing.assert_close(teacher, open_store(digits_store).read([5, 9, 100, 3]))
    with pytest.raises(ConfigError, match=r"indices must lie in \[0, 1437\)"):
        TeacherLogits(build_dataset("digits", split="train"), digits_store, indices=[1437])


def test_the_worker_loader_gives_the_same_batches(digits_store):
    pairs = TeacherLogits(build_dataset("digits", split="train"), digits_store, indices=range(70))
    direct = list(DataLoader(pairs, batch_size=32, collate_fn=pairs.collate))
    through_workers = list(pairs.loader(batch_size=32, num_workers=1))
    assert len(direct) == len(through_workers) == 3
    for (x1, y1, t1), (x2, y2, t2) in zip(direct, through_workers, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2) and torch.equal(t1, t2)


def test_a_store_of_other_data_is_refused_for_any_dataset(digits_store):
    with pytest.raises(
        StoreMismatchError, match="holds 1437 samples but dataset 'digits' \\(test\\)"
    ):
        TeacherLogits(build_dataset("digits", split="test"), digits_store)
    train_set = build_dataset("digits", split="train")
    inputs = torch.stack([train_set[i][0] for i in range(len(train_set))])
    labels = torch.from_numpy(train_set.labels)
    TeacherLogits(TensorDataset(inputs, labels), digits_store)  # a plain dataset of the same data
    altered = inputs.clone()
    altered[0] += 1
    with pytest.raises(StoreMismatchError, match="inputs differ.*check_inputs=False"):
        TeacherLogits(TensorDataset(altered, labels), digits_store)
    TeacherLogits(TensorDataset(altered, labels), digits_store, check_inputs=False)
    shuffled = TensorDataset(inputs, labels.roll(1))
    shuffled.labels = labels.roll(1).numpy()  # a dataset exposing its labels: they are compared
    with pytest.raises(StoreMismatchError, match="labels differ"):
        TeacherLogits(shuffled, digits_store, check_inputs=False)
