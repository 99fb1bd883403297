"""kdcache.data.loaders: batches that never end an epoch on one sample, in the seeded order."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader, TensorDataset

from kdcache import TrainConfig
from kdcache.data.loaders import NoSingletonBatchSampler, make_loader
from kdcache.train.loop import train


@pytest.mark.parametrize("batch_size", [1, 2, 3, 5])
def test_a_last_batch_of_one_joins_the_batch_before(batch_size):
    for num_samples in range(12):
        batches = list(NoSingletonBatchSampler(range(num_samples), batch_size))
        expected = list(BatchSampler(range(num_samples), batch_size, drop_last=False))
        if batch_size > 1 and len(expected) > 1 and len(expected[-1]) == 1:
            expected[-2:] = [expected[-2] + expected[-1]]
        assert batches == expected, (num_samples, batch_size)
        assert len(NoSingletonBatchSampler(range(num_samples), batch_size)) == len(batches)
        assert all(len(batch) > 1 for batch in batches) or batch_size == 1 or num_samples == 1


def test_the_seeded_shuffle_and_the_workers_seeds_are_those_of_a_plain_loader():
    """Runs trained before keep their order: the same samples in the same batches, and the
    same generator draws (the workers' seeds come from it)."""
    samples = torch.arange(23)
    ours = make_loader(
        TensorDataset(samples, samples),
        batch_size=5,
        num_workers=0,
        device=torch.device("cpu"),
        shuffle=True,
        seed=7,
    )
    generator = torch.Generator().manual_seed(7)
    plain = DataLoader(TensorDataset(samples), batch_size=5, shuffle=True, generator=generator)
    for _ in range(2):  # two epochs: the generator carries on
        assert [batch[2].tolist() for batch in ours] == [batch[0].tolist() for batch in plain]
    assert ours.generator is not None
    assert torch.equal(ours.generator.get_state(), generator.get_state())


def test_a_batch_norm_student_trains_on_a_set_one_longer_than_a_multiple_of_the_batch(tmp_path):
    """21 samples in batches of 10: two steps an epoch (10 and 11), not a third of one sample,
    which BatchNorm1d refuses to train on (it stopped the run with a ValueError)."""
    out = tmp_path / "run"
    train(
        TrainConfig(
            model="teachers:dropout", dataset="fake:21:8:4", batch_size=10, epochs=2, out=str(out)
        )
    )
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4]
