"""kdcache.distributed: epoch shards, the dump plan, fsync in one process; the optimizer state
ranks share after an uneven epoch, in two."""

from __future__ import annotations

import itertools
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from kdcache.data.loaders import EpochShardSampler
from kdcache.distributed import rank_info, rank_session
from kdcache.errors import ConfigError
from kdcache.store.ranks.partition import (
    MIN_UNITS,
    dump_batches,
    owned_chunks,
    sequence_plan,
    unit_chunks,
)
from kdcache.store.read.logit_feed import LogitFeed
from kdcache.store.read.reader import open_store
from kdcache.store.sequence import rows_of, sequence_offsets
from kdcache.store.write import durability
from kdcache.store.write.writer import create_store


def assert_partition(shares: list[list[int]], num_samples: int) -> None:
    """Every index in exactly one share: no duplicate (padding) and none missing."""
    joined = np.concatenate([np.asarray(share, dtype=np.int64) for share in shares])
    assert joined.size == num_samples
    np.testing.assert_array_equal(np.sort(joined), np.arange(num_samples))


@pytest.mark.parametrize(("num_samples", "world_size"), [(101, 2), (101, 3), (7, 3), (2, 3)])
def test_epoch_shards_hold_every_index_once_per_epoch(num_samples, world_size):
    samplers = [
        EpochShardSampler(num_samples, rank=rank, world_size=world_size, seed=5)
        for rank in range(world_size)
    ]
    epochs = []
    for _ in range(3):
        lengths = [len(sampler) for sampler in samplers]
        shares = [list(sampler) for sampler in samplers]
        assert [len(share) for share in shares] == lengths
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
        assert_partition(shares, num_samples)
        epochs.append(np.concatenate(shares))
    assert not np.array_equal(epochs[0], epochs[1]) or num_samples < 3  # a new order each epoch


def test_chunked_feed_shares_give_each_rank_whole_chunks(tmp_path):
    writer = create_store(tmp_path / "s.zarr", num_samples=103, num_classes=3, chunk_rows=10)
    writer.write(np.arange(103), np.zeros((103, 3), dtype=np.float32))
    writer.finalize()
    reader = open_store(tmp_path / "s.zarr")
    for mode in ("chunked", "memory"):
        feed = LogitFeed(reader, memory_budget=4 * feed_chunk_bytes(reader), mode=mode)
        for epoch in range(2):
            samplers = [feed.sampler(seed=1, rank=r, world_size=3) for r in range(3)]
            for sampler in samplers:
                sampler.epoch = epoch
            lengths = [len(sampler) for sampler in samplers]  # before iterating: for this epoch
            shares = [list(sampler) for sampler in samplers]
            assert [len(share) for share in shares] == lengths
            assert_partition(shares, 103)
            if mode == "chunked":
                owners = [{i // 10 for i in share} for share in shares]
                assert not (owners[0] & owners[1])
                assert not (owners[0] & owners[2])
                assert not (owners[1] & owners[2])
    # One process is unchanged by the new arguments: rank 0 of 1 gets the whole epoch order.
    feed = LogitFeed(reader, memory_budget=4 * feed_chunk_bytes(reader), mode="chunked")
    np.testing.assert_array_equal(
        feed.epoch_order(3, seed=1), feed.epoch_order(3, seed=1, rank=0, world_size=1)
    )


def feed_chunk_bytes(reader) -> int:
    return reader.encoding.row_nbytes(reader.num_classes) * reader.metadata.chunk_rows


@pytest.mark.parametrize(
    ("num_samples", "chunk_rows", "batch_size"),
    [(200, 20, 15), (70, 20, 15), (5000, 7, 16), (100_000, 100, 256), (3000, 64, 64)],
)
def test_the_dump_plan_writes_every_row_once_in_the_same_batches_for_any_rank_count(
    num_samples, chunk_rows, batch_size
):
    num_chunks = -(-num_samples // chunk_rows)
    rng = np.random.default_rng(0)
    pending_chunks = np.flatnonzero(rng.random(num_chunks) < 0.6)  # a resumed dump
    pending = np.concatenate(
        [np.arange(c * chunk_rows, min((c + 1) * chunk_rows, num_samples)) for c in pending_chunks]
    )
    options = dict(num_samples=num_samples, chunk_rows=chunk_rows, batch_size=batch_size)
    alone = dump_batches(pending, **options)
    per_unit = unit_chunks(num_chunks=num_chunks, chunk_rows=chunk_rows, batch_size=batch_size)
    for batch in alone:
        assert len(batch) <= batch_size
        assert len({row // (per_unit * chunk_rows) for row in batch}) == 1  # never across units
    for world_size in (2, 3, 8):
        plans = [
            dump_batches(pending, **options, rank=rank, world_size=world_size)
            for rank in range(world_size)
        ]
        # The same batches as one process, split between the ranks without overlap...
        assert sorted(map(tuple, itertools.chain.from_iterable(plans))) == sorted(map(tuple, alone))
        for rank, plan in enumerate(plans):
            mine = set(
                owned_chunks(num_chunks, per_unit=per_unit, rank=rank, world_size=world_size)
            )
            # ...each rank computing only batches of its own (whole) chunks.
            assert {row // chunk_rows for batch in plan for row in batch} <= mine
    covered = np.unique(np.concatenate([np.asarray(batch) for batch in alone]))
    assert set(pending) <= set(covered)
    pending_set = set(pending.tolist())
    assert all(pending_set.intersection(batch) for batch in alone)  # no batch recomputed in vain


@pytest.mark.parametrize(
    ("num_sequences", "chunk_rows", "batch_size"), [(27, 8, 2), (300, 16, 7), (2000, 300, 32)]
)
def test_a_sequence_plan_writes_every_pending_token_row_once_in_the_same_blocks_for_any_rank_count(
    num_sequences, chunk_rows, batch_size
):
    rng = np.random.default_rng(0)
    offsets = sequence_offsets(rng.integers(2, 40, size=num_sequences))
    num_chunks = -(-int(offsets[-1]) // chunk_rows)
    pending_chunks = np.flatnonzero(rng.random(num_chunks) < 0.6)  # a resumed dump
    pending = np.concatenate(
        [np.arange(c * chunk_rows, min((c + 1) * chunk_rows, offsets[-1])) for c in pending_chunks]
    )
    options = dict(offsets=offsets, chunk_rows=chunk_rows, batch_size=batch_size)

    def writes(world_size: int) -> list[tuple[int, tuple[int, ...]]]:
        """Each (first sample of the batch, token rows of one write), over every rank."""
        found = []
        for rank in range(world_size):
            plan = sequence_plan(pending, **options, rank=rank, world_size=world_size)
            for batch in plan.batches:
                assert batch == list(range(batch[0], min(batch[0] + batch_size, num_sequences)))
                assert batch[0] % batch_size == 0  # the grid, whatever the rank count
                rows = rows_of(offsets, np.asarray(batch))
                found += [
                    (batch[0], tuple(rows[block].tolist()))
                    for block in plan.blocks(rows)
                    if np.isin(rows[block], pending).any()  # the writer skips written chunks
                ]
        return sorted(found)

    alone = writes(1)
    written = np.concatenate([np.asarray(rows) for _, rows in alone])
    assert set(pending.tolist()) <= set(written.tolist())
    assert len(np.unique(written)) == len(written)  # no row written twice
    for world_size in (2, 3, 8):
        assert writes(world_size) == alone  # the same rows, in the same blocks and batches


def test_units_hold_several_batches_unless_that_leaves_too_few_units():
    assert unit_chunks(num_chunks=10_000, chunk_rows=100, batch_size=256) == 21  # 8 batches
    assert unit_chunks(num_chunks=10 * MIN_UNITS, chunk_rows=100, batch_size=256) == 10
    assert unit_chunks(num_chunks=10, chunk_rows=20, batch_size=15) == 1


def test_rank_info_reads_torchrun_variables(monkeypatch):
    assert rank_info().world_size == 1
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    info = rank_info()
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size) == (2, 4, 0, 2)
    assert info.is_distributed
    assert not info.is_main
    monkeypatch.setenv("RANK", "two")
    with pytest.raises(ConfigError, match="RANK='two' is not an integer"):
        rank_info()


@pytest.mark.parametrize("fsync", [True, False])
def test_each_local_chunk_and_its_flag_are_flushed_before_the_next_step(
    tmp_path, monkeypatch, fsync
):
    flushed: list[str] = []
    real_fsync_path = durability.fsync_path

    def recording_fsync_path(path):
        flushed.append(
            str(path.relative_to(tmp_path / "s.zarr")) if path != tmp_path / "s.zarr" else "."
        )
        real_fsync_path(path)

    monkeypatch.setattr(durability, "fsync_path", recording_fsync_path)
    writer = create_store(
        tmp_path / "s.zarr",
        num_samples=20,
        num_classes=12,
        chunk_rows=10,
        encoding="topk:3",
        fsync=fsync,
    )
    writer.write(np.arange(10), np.random.default_rng(0).normal(size=(10, 12)))
    if not fsync:
        writer.write(np.arange(10, 20), np.zeros((10, 12)))
        writer.finalize()
        assert flushed == []
        return
    layout = writer.encoding.layout(12)
    # Chunk 0 of every array, the folders up to the store's root, then its flag: in that order.
    data = {f"{name}/c/0" + "/0" * len(shape) for name, (shape, _) in layout.items()}
    assert set(flushed[: len(layout)]) == data
    folders = {path.rpartition("/")[0] for path in data} | set(layout)
    assert folders <= set(flushed[: flushed.index("chunk_written/c/0")])
    assert flushed.index("chunk_written/c/0") > flushed.index(".")
    writer.write(np.arange(10, 20), np.zeros((10, 12)))
    writer.finalize()
    assert flushed[-2:] == ["zarr.json", "."]


def _align_after(rank: int, port: int, steps: list[int], out: str) -> None:
    """Rank ``rank`` of 2 takes ``steps[rank]`` Adam steps, then takes rank 0's state."""
    os.environ.update(
        RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    with rank_session("cpu") as session:
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 2)
        optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
        for step in range(steps[rank]):
            optimizer.zero_grad()
            model(torch.full((1, 3), float(rank + step))).sum().backward()
            optimizer.step()
        session.align_optimizer(optimizer, torch.amp.GradScaler("cpu", enabled=False), src=0)
        torch.save(optimizer.state_dict(), f"{out}/rank{rank}.pt")


@pytest.mark.parametrize("steps", [[3, 2], [3, 0]], ids=["a-step-behind", "never-stepped"])
def test_every_rank_takes_the_source_ranks_optimizer_state(tmp_path, steps):
    """What a rank that sat out steps (DDP's join) gets at an epoch's end: rank 0's Adam moments
    and step counts, also where it has no state at all."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_align_after, args=(port, steps, str(tmp_path)), nprocs=2)
    first, second = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert first["state"].keys() == second["state"].keys() == {0, 1}
    for index, state in first["state"].items():
        for name, value in state.items():
            assert torch.equal(value, second["state"][index][name])
    assert float(first["state"][0]["step"]) == steps[0]


def _tail_step(rank: int, port: int, out: str) -> None:
    """An epoch's last step under DDP's join, each batch all-reduced: rank 0 has 2 batches
    (loss x w halved, x = 1 then 10), rank 1 one (x = 100), then joins."""
    os.environ.update(
        RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    with rank_session("cpu") as session:
        model = torch.nn.Linear(1, 1, bias=False)
        torch.nn.init.zeros_(model.weight)
        trained = session.wrap_model(model)
        window = [1.0, 10.0] if rank == 0 else [100.0]
        for step in session.joined(trained, [window]):
            summed = session.gradient_sum(model, batches=len(step))
            for x in step:
                if summed is not None:
                    summed.set_aside()
                (trained(torch.tensor([[x]])).sum() / len(step)).backward()
            if summed is not None:
                summed.put_back()
        assert model.weight.grad is not None
        torch.save(model.weight.grad, f"{out}/rank{rank}.pt")


def test_a_step_whose_batches_are_reduced_one_by_one_keeps_each_batchs_share(tmp_path):
    """The step's gradient is the mean over ranks of each rank's own mean ((1 + 10) / 2 and
    100): 52.75 on the rank whose model the join keeps, not 27.625, as it was when a joined
    rank's zeros divided the first batch's already-reduced gradient a second time."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_tail_step, args=(port, str(tmp_path)), nprocs=2)
    assert torch.load(tmp_path / "rank0.pt", weights_only=True).item() == 52.75
