"""TeacherLogits: your own training loop over a dataset paired with its store."""

from __future__ import annotations

import itertools
import os
import shutil

import pytest
import torch
from conftest import REPO_ROOT
from narrowing import dense, present
from teachers import seeded
from torch.utils.data import DataLoader, TensorDataset

from kdcache import DumpConfig, LogitsDistillationLoss, SparseLogits, TeacherLogits, open_store
from kdcache.data.datasets import build_dataset
from kdcache.dump.teacher import dump_teacher
from kdcache.errors import ConfigError, StoreMismatchError
from kdcache.train.loop import evaluate
from kdcache.train.views import cached_views


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
    assert torch.equal(x, train_set[7][0])
    assert y == train_set[7][1]
    assert isinstance(teacher, SparseLogits)
    assert teacher.shape == (1, 10)

    reads = []
    read = store.read

    def counting_read(indices):
        reads.append(list(indices))
        return read(indices)

    store.read = counting_read  # type: ignore[method-assign]  # counts the reads
    loader = DataLoader(pairs, batch_size=32, shuffle=True, collate_fn=pairs.collate)
    batches = list(loader)
    assert len(reads) == len(batches) == len(loader)  # one store read per batch
    assert sorted(itertools.chain.from_iterable(reads)) == list(range(len(train_set)))
    x, y, teacher = batches[0]
    assert x.shape == (32, 1, 8, 8)
    assert y.shape == (32,)
    assert isinstance(teacher, SparseLogits)
    assert teacher.shape == (32, 10)
    want = read(reads[0])
    assert isinstance(want, SparseLogits)
    torch.testing.assert_close(teacher.values, want.values)
    torch.testing.assert_close(teacher.indices, want.indices)
    # items gathered one by one collate to the same batch as one read
    _, _, one_by_one = pairs.collate([pairs[row] for row in reads[0]])
    assert isinstance(one_by_one, SparseLogits)
    torch.testing.assert_close(one_by_one.values, want.values)
    torch.testing.assert_close(one_by_one.tail, want.tail)
    student = torch.randn(32, 10)
    loss = LogitsDistillationLoss(temperature=3.0)
    torch.testing.assert_close(loss(student, teacher, y)["total"], loss(student, want, y)["total"])


def test_a_dense_store_batches_into_one_tensor_and_indices_keep_a_subset(digits_store):
    pairs = TeacherLogits(
        build_dataset("digits", split="train"), digits_store, indices=[5, 9, 100, 3]
    )
    _x, _y, teacher = next(iter(DataLoader(pairs, batch_size=4, collate_fn=pairs.collate)))
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
        assert torch.equal(x1, x2)
        assert torch.equal(y1, y2)
        assert torch.equal(dense(t1), dense(t2))


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
    with pytest.raises(StoreMismatchError, match=r"inputs differ.*check_inputs=False"):
        TeacherLogits(TensorDataset(altered, labels), digits_store)
    TeacherLogits(TensorDataset(altered, labels), digits_store, check_inputs=False)
    shuffled = TensorDataset(inputs, labels.roll(1))
    # a dataset exposing its labels: they are compared
    shuffled.labels = labels.roll(1).numpy()  # type: ignore[attr-defined]
    with pytest.raises(StoreMismatchError, match="labels differ"):
        TeacherLogits(shuffled, digits_store, check_inputs=False)


@pytest.fixture(scope="module")
def views_store(tmp_path_factory):
    """A float32 store of 3 mixed views per sample of a tiny image set, from a seeded teacher."""
    out = tmp_path_factory.mktemp("pairing-views") / "views.zarr"
    dump_teacher(
        DumpConfig(
            teacher="teachers:seeded",
            dataset="fake:24:8:4",
            out=str(out),
            encoding="float32",
            views=3,
            augment="pad-crop:1+flip+mixup:0.4",
            augment_seed=2,
            device="cpu",
        )
    )
    return out


def test_a_store_with_views_pairs_each_recreated_view_with_its_own_row(views_store):
    train_set = build_dataset("fake:24:8:4")
    reader = open_store(views_store)
    pairs = TeacherLogits(train_set, reader, indices=[20, 3])
    assert len(pairs) == 6  # every view of each chosen sample
    distilled = cached_views(
        reader,
        train_set,
        augment=None,
        augment_seed=None,
        views=None,
        student_augment=None,
        seed=0,
        feed=reader.feed,
    )
    teacher = seeded(num_classes=4, in_channels=3).eval()
    x, y, logits = next(iter(DataLoader(pairs, batch_size=6, collate_fn=pairs.collate)))
    rows = [20 * 3, 20 * 3 + 1, 20 * 3 + 2, 9, 10, 11]
    for item, row in enumerate(rows):
        assert pairs.sample_index(item) == row // 3
        view, label = present(distilled).dataset[row]  # the pixels and label distill trains on
        assert torch.equal(x[item], view)
        assert y[item] == label
    torch.testing.assert_close(logits, reader.read(rows))
    with torch.no_grad():  # the teacher's logits on exactly these pixels
        torch.testing.assert_close(logits, teacher(x), rtol=1e-5, atol=1e-5)
    assert not torch.equal(x[0], x[1])  # distinct views, not the clean sample repeated
    for (x1, y1, t1), (x2, y2, t2) in zip(
        DataLoader(pairs, batch_size=4, collate_fn=pairs.collate),
        pairs.loader(batch_size=4, num_workers=1),
        strict=True,
    ):
        assert torch.equal(x1, x2)
        assert torch.equal(y1, y2)
        assert torch.equal(dense(t1), dense(t2))


def test_a_store_whose_views_cannot_be_recreated_is_refused(tmp_path, views_store):
    copy = tmp_path / "views.zarr"
    shutil.copytree(views_store, copy)
    shutil.rmtree(copy / "view_params")
    with pytest.raises(StoreMismatchError, match="lacks its view_params array"):
        TeacherLogits(build_dataset("fake:24:8:4"), copy)
