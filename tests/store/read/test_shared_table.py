"""One decoded table per node: kdcache.store.read.shared_table with real stores and real
processes, and the attacks on it (planted folders and links, forged, stale or damaged tables)."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import cli_environment
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from narrowing import logit_feed, present

from kdcache.errors import KdcacheError
from kdcache.store.read.private_folder import PRIVATE_ENV, SHARED_DIR_ENV
from kdcache.store.read.reader import StoreReader, open_store
from kdcache.store.read.shared_table import (
    store_identity,
    table_arrays,
    table_name,
)
from kdcache.store.write.writer import create_store

#: The second local user of the attacks: nobody.
OTHER_UID = 65534
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="simulating another local user needs root")


def make_store(path, num_samples, num_classes, encoding="float16", *, seed=0, overwrite=False):
    logits = np.random.default_rng(seed).normal(size=(num_samples, num_classes)).astype(np.float32)
    writer = create_store(
        path,
        num_samples=num_samples,
        num_classes=num_classes,
        encoding=encoding,
        chunk_rows=8,
        fsync=False,
        overwrite=overwrite,
    )
    writer.write(np.arange(num_samples), logits)
    writer.finalize()
    return logits


@pytest.fixture
def shm(tmp_path, monkeypatch):
    """A shared root of this test's own; the private folder a fallback names is forgotten after."""
    monkeypatch.setenv(SHARED_DIR_ENV, str(tmp_path / "shm"))
    os.environ.pop(PRIVATE_ENV, None)
    yield tmp_path / "shm"
    os.environ.pop(PRIVATE_ENV, None)


@pytest.fixture
def world_root(monkeypatch):
    """A shared root every local user can write, like /dev/shm (sticky, 1777)."""
    folder = Path(tempfile.mkdtemp(prefix="kdcache-test-root-"))
    folder.chmod(0o1777)
    monkeypatch.setenv(SHARED_DIR_ENV, str(folder))
    os.environ.pop(PRIVATE_ENV, None)
    yield folder
    os.environ.pop(PRIVATE_ENV, None)
    shutil.rmtree(folder)


def as_other_user(action: Callable[..., object], *args: object) -> str:
    """Run ``action(*args)`` in a child process under uid and gid 65534; its outcome as text."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(OTHER_UID)
            os.setuid(OTHER_UID)
            outcome = f"ok {action(*args)}"
        except BaseException as error:
            outcome = f"{type(error).__name__}: {error}"
        os.write(write, outcome.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as stream:
        outcome = stream.read().decode()
    os.waitpid(pid, 0)
    return outcome


def private(root: Path) -> Path:
    return root / f"kdcache-{os.geteuid()}"


def name_of(reader: StoreReader) -> str:
    identity = store_identity(reader.where, reader.metadata, reader.content_digest())
    arrays = table_arrays(reader.encoding.layout(reader.num_classes), reader.num_rows)
    return table_name(identity, arrays)


def shared_rows(reader: StoreReader) -> np.ndarray:
    reader.feed.load(shared=True)
    return reader.read_dense(np.arange(reader.num_samples)).numpy()


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A 40 x 5 float16 store in chunks of 8 rows, and its rows as any reader decodes them."""
    path = tmp_path_factory.mktemp("small") / "s.zarr"
    make_store(path, 40, 5)
    return path, open_store(path).read_dense(np.arange(40)).numpy()


def test_readers_share_one_table_and_the_last_one_removes_it(tmp_path, shm):
    make_store(tmp_path / "s.zarr", 300, 17, encoding="topk:4")
    first, second = open_store(tmp_path / "s.zarr"), open_store(tmp_path / "s.zarr")
    reference = open_store(tmp_path / "s.zarr")
    first.feed.load(shared=True)
    second.feed.load(shared=True)
    assert first.feed.chunks_decoded > 0
    assert second.feed.chunks_decoded == 0
    rows = np.random.default_rng(1).integers(0, 300, size=64)
    for temperature in (1.0, 4.0):
        expected = reference.read_dense(rows, temperature=temperature).numpy()
        for reader in (first, second):
            shared = reader.read_dense(rows, temperature=temperature)
            np.testing.assert_array_equal(shared, expected)
    name = name_of(first)
    assert sorted(p.name for p in private(shm).glob("*.npy")) == sorted(
        f"{name}.{array}.npy" for array in first.encoding.layout(17)
    )
    present(logit_feed(first.feed)._shared).close()
    assert (private(shm) / f"{name}.json").exists()  # still mapped by the second reader
    present(logit_feed(second.feed)._shared).close()
    assert not list(private(shm).iterdir())
    # A later reader builds it afresh.
    third = open_store(tmp_path / "s.zarr")
    third.feed.load(shared=True)
    np.testing.assert_array_equal(
        third.read_dense(rows, temperature=4.0), reference.read_dense(rows, temperature=4.0)
    )


def test_the_private_folder_is_0700_and_every_file_0600_and_ours(small, shm):
    path, _ = small
    reader = open_store(path)
    reader.feed.load(shared=True)
    folder = os.lstat(private(shm))
    assert stat.S_ISDIR(folder.st_mode)
    assert stat.S_IMODE(folder.st_mode) == 0o700
    assert folder.st_uid == os.geteuid()
    files = list(private(shm).iterdir())
    assert {p.suffix for p in files} == {".npy", ".json", ".lock", ".users"}
    for file in files:
        found = os.lstat(file)
        assert stat.S_ISREG(found.st_mode), file
        assert stat.S_IMODE(found.st_mode) == 0o600, file
        assert found.st_uid == os.geteuid()


@as_root
def test_another_user_reads_and_plants_nothing_in_the_private_folder(small, world_root):
    path, expected = small
    reader = open_store(path)
    np.testing.assert_array_equal(shared_rows(reader), expected)
    table = next(private(world_root).glob("*.npy"))

    def read_table() -> int:
        return len(table.read_bytes())

    def plant() -> None:
        (private(world_root) / f"{name_of(reader)}.planted").write_text("")

    assert as_other_user(read_table).startswith("PermissionError")
    assert as_other_user(os.listdir, str(private(world_root))).startswith("PermissionError")
    assert as_other_user(plant).startswith("PermissionError")


def plant_folder_of_links(folder: str, name: str, victim: str) -> None:
    """What another user can do first: make our folder and link every name we use to a file of
    ours, and forge a complete-looking record."""
    os.mkdir(folder, 0o777)
    os.chmod(folder, 0o777)
    for suffix in ("lock", "users", "json.tmp", "logits.npy", "logits.npy.tmp"):
        os.symlink(victim, os.path.join(folder, f"{name}.{suffix}"))
    with open(os.path.join(folder, f"{name}.json"), "w") as stream:
        stream.write("{}")


def plant_link_to_own_folder(folder: str, elsewhere: str) -> None:
    os.mkdir(elsewhere, 0o777)
    os.chmod(elsewhere, 0o777)
    os.symlink(elsewhere, folder)


@as_root
@pytest.mark.parametrize("planted", ["folder of links", "link to a folder", "file"])
def test_a_folder_planted_by_another_user_is_never_used(small, world_root, caplog, planted):
    path, expected = small
    reader = open_store(path)
    victim = world_root / "victim.txt"  # a file only we may write
    victim.write_text("precious")
    victim.chmod(0o644)
    folder = private(world_root)
    if planted == "folder of links":
        outcome = as_other_user(plant_folder_of_links, str(folder), name_of(reader), str(victim))
    elif planted == "link to a folder":
        outcome = as_other_user(plant_link_to_own_folder, str(folder), str(world_root / "else"))
    else:
        outcome = as_other_user(Path.write_text, folder, "x")
    assert outcome.startswith("ok"), outcome
    before = sorted(os.listdir(folder)) if folder.is_dir() and not folder.is_symlink() else None
    caplog.set_level(logging.WARNING, logger="kdcache")
    np.testing.assert_array_equal(shared_rows(reader), expected)
    assert victim.read_text() == "precious"
    assert os.lstat(folder).st_uid == OTHER_UID  # left as it was
    if before is not None:
        assert sorted(os.listdir(folder)) == before
    table = Path(present(logit_feed(reader.feed)._shared).folder)
    assert table.parent == world_root
    assert table.name.startswith(f"kdcache-{os.geteuid()}-")
    assert stat.S_IMODE(os.lstat(table).st_mode) == 0o700
    assert os.environ[PRIVATE_ENV] == str(table)  # what the workers this process starts inherit
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert str(folder) in warning
    assert "\n" not in warning


RANK = """
import json, sys
from kdcache.distributed import rank_session
from kdcache.store.read.private_folder import adopt_private_folder, private_folder
from kdcache.store.read.reader import open_store

with rank_session("cpu") as session:
    adopt_private_folder(str(session.on_local_main(private_folder)))  # as distill's ranks do
    reader = open_store(sys.argv[1])
    reader.feed.load(shared=True)
    folder = str(reader.feed._shared.folder)
    decoded = reader.feed.chunks_decoded
    session.barrier()  # both hold the table before either lets go
print(json.dumps({"folder": folder, "decoded": decoded}))
"""


@as_root
def test_the_ranks_on_one_machine_share_the_folder_made_in_place_of_a_planted_one(
    small, world_root
):
    path, _ = small
    folder = private(world_root)
    assert as_other_user(os.mkdir, str(folder), 0o777).startswith("ok")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    process = subprocess.run(
        [*torchrun, "--nproc-per-node=2", "--no-python", sys.executable, "-c", RANK, str(path)],
        env=cli_environment({SHARED_DIR_ENV: str(world_root)}),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert process.returncode == 0, process.stderr
    # The ranks print at once: their lines may run together, so each object is found on its own.
    ranks = [json.loads(found) for found in re.findall(r"\{[^{}]*\}", process.stdout)]
    assert len(ranks) == 2
    assert ranks[0]["folder"] == ranks[1]["folder"] != str(folder)
    assert sorted(rank["decoded"] > 0 for rank in ranks) == [False, True]  # one decoded it
    assert not os.listdir(folder)


@pytest.mark.parametrize("planted", ["link", "open folder", "file"])
def test_a_private_folder_that_is_not_private_is_not_used(small, shm, planted):
    path, expected = small
    shm.mkdir()
    folder = private(shm)
    if planted == "link":
        (shm / "elsewhere").mkdir(mode=0o700)
        folder.symlink_to(shm / "elsewhere")
    elif planted == "open folder":
        folder.mkdir()
        folder.chmod(0o755)
    else:
        folder.write_text("")
    reader = open_store(path)
    np.testing.assert_array_equal(shared_rows(reader), expected)
    assert present(logit_feed(reader.feed)._shared).folder != folder
    if planted == "link":
        assert not list((shm / "elsewhere").iterdir())
    elif planted == "open folder":
        assert not list(folder.iterdir())


def test_a_named_private_folder_that_is_not_private_is_refused_in_one_line(small, shm):
    path, _ = small
    shm.mkdir()
    (shm / "open").mkdir(mode=0o755)
    os.environ[PRIVATE_ENV] = str(shm / "open")
    with pytest.raises(KdcacheError) as raised:
        open_store(path).feed.load(shared=True)
    message = str(raised.value)
    assert "\n" not in message
    assert "mode 0755" in message
    assert PRIVATE_ENV in message


def test_links_at_the_table_names_are_not_followed(small, shm):
    path, expected = small
    reader = open_store(path)
    name = name_of(reader)
    victim = shm.parent / "victim.txt"
    victim.write_text("precious")
    private(shm).mkdir(parents=True, mode=0o700)
    for suffix in ("json", "json.tmp", "logits.npy"):
        (private(shm) / f"{name}.{suffix}").symlink_to(victim)
    np.testing.assert_array_equal(shared_rows(reader), expected)
    assert victim.read_text() == "precious"
    assert not any(p.is_symlink() for p in private(shm).iterdir())


def test_a_link_at_the_lock_file_is_refused_in_one_line(small, shm):
    path, _ = small
    reader = open_store(path)
    victim = shm.parent / "victim.txt"
    victim.write_text("precious")
    private(shm).mkdir(parents=True, mode=0o700)
    (private(shm) / f"{name_of(reader)}.lock").symlink_to(victim)
    with pytest.raises(KdcacheError) as raised:
        reader.feed.load(shared=True)
    assert "\n" not in str(raised.value)
    assert "symbolic link" in str(raised.value)
    assert victim.read_text() == "precious"


@pytest.mark.parametrize("suffix", ["json", "logits.npy"])
def test_a_folder_at_a_table_name_is_refused_in_one_line(small, shm, suffix):
    path, _ = small
    reader = open_store(path)
    private(shm).mkdir(parents=True, mode=0o700)
    (private(shm) / f"{name_of(reader)}.{suffix}" / "kept").mkdir(parents=True)
    with pytest.raises(KdcacheError) as raised:
        reader.feed.load(shared=True)
    assert "\n" not in str(raised.value)
    assert f"{name_of(reader)}.{suffix}" in str(raised.value)
    assert (private(shm) / f"{name_of(reader)}.{suffix}" / "kept").is_dir()
    assert not list(private(shm).glob("*.npy*")) or suffix == "logits.npy"  # no table left
    assert not list(private(shm).glob("*.tmp"))


def hold_table(path: Path) -> tuple[StoreReader, Path]:
    """A reader that keeps the store's shared table mapped, and the table's logits file."""
    keeper = open_store(path)
    keeper.feed.load(shared=True)
    table = present(logit_feed(keeper.feed)._shared)
    return keeper, table.folder / f"{table.name}.logits.npy"


def replace_file(file: Path, content: np.ndarray) -> None:
    file.unlink()
    np.save(file, content)
    file.chmod(0o600)


@pytest.mark.parametrize(
    "forgery",
    ["other values", "float64", "fewer rows", "more classes", "fortran order", "no record"],
)
def test_a_forged_or_wrong_table_is_rebuilt_not_used(small, shm, caplog, forgery):
    path, expected = small
    keeper, file = hold_table(path)
    stored = np.load(file)
    if forgery == "other values":
        replace_file(file, stored[::-1].copy())
    elif forgery == "float64":
        replace_file(file, stored.astype(np.float64))
    elif forgery == "fewer rows":
        replace_file(file, stored[:-1])
    elif forgery == "more classes":
        replace_file(file, np.zeros((40, 6), dtype=stored.dtype))
    elif forgery == "fortran order":
        replace_file(file, np.asfortranarray(stored))
    else:
        file.with_suffix("").with_suffix(".json").unlink()
    caplog.set_level(logging.WARNING, logger="kdcache")
    reader = open_store(path)
    np.testing.assert_array_equal(shared_rows(reader), expected)
    assert reader.feed.chunks_decoded > 0  # decoded again, not attached
    assert np.load(file).dtype == np.float16
    assert np.load(file).shape == (40, 5)
    if forgery != "no record":
        (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert "decoding the store again" in warning
        assert "\n" not in warning
    present(logit_feed(keeper.feed)._shared).close()


def abandon(reader: StoreReader) -> None:
    """Let go of the reader's table as a killed process would: its locks drop, its files stay."""
    _, _, handles, _ = present(present(logit_feed(reader.feed)._shared)._closer.detach())
    for descriptor in handles[2:4]:  # the private folder and the users lock
        os.close(descriptor)


def test_tables_abandoned_in_another_private_folder_are_removed(small, shm):
    path, expected = small
    shm.mkdir()
    other = Path(tempfile.mkdtemp(prefix=f"kdcache-{os.geteuid()}-", dir=shm))
    os.environ[PRIVATE_ENV] = str(other)  # as a job that found its folder planted
    left = open_store(path)
    left.feed.load(shared=True)
    abandon(left)
    in_use = open_store(path)
    in_use.feed.load(shared=True)  # another job on it, still running
    os.environ.pop(PRIVATE_ENV)
    assert list(other.iterdir())
    reader = open_store(path)
    np.testing.assert_array_equal(shared_rows(reader), expected)
    assert list(other.iterdir())  # mapped by the running job
    present(logit_feed(in_use.feed)._shared).close()
    assert not list(other.iterdir())
    left = open_store(path)
    os.environ[PRIVATE_ENV] = str(other)
    left.feed.load(shared=True)
    abandon(left)
    os.environ.pop(PRIVATE_ENV)
    open_store(path).feed.load(shared=True)
    assert not list(other.iterdir())  # removed by the next job that opens a table


KILLED = """
import os, signal, sys
from kdcache.store.read.reader import open_store
reader = open_store(sys.argv[1])
reader.feed.load(shared=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def kill_while_mapped(path: Path, root: Path) -> None:
    process = subprocess.run(
        [sys.executable, "-c", KILLED, str(path)],
        env=cli_environment({SHARED_DIR_ENV: str(root)}),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert process.returncode == -signal.SIGKILL, process.stderr


def test_a_table_left_by_a_killed_job_is_reused_while_the_store_is_the_same(small, shm):
    path, expected = small
    kill_while_mapped(path, shm)
    left = sorted(p.name for p in private(shm).iterdir())
    reader = open_store(path)
    np.testing.assert_array_equal(shared_rows(reader), expected)
    assert reader.feed.chunks_decoded == 0  # checked and attached
    assert sorted(p.name for p in private(shm).iterdir()) == left


def test_a_stale_table_is_not_used_after_the_store_changed_and_is_removed(tmp_path, shm):
    path = tmp_path / "s.zarr"
    make_store(path, 40, 5, seed=0)
    kill_while_mapped(path, shm)
    stale = {p.name.split(".")[0] for p in private(shm).iterdir()}
    changed = make_store(path, 40, 5, seed=1, overwrite=True)
    reader = open_store(path)
    rows = shared_rows(reader)
    np.testing.assert_allclose(rows, changed, atol=1e-2)  # float16 of the new logits
    assert reader.feed.chunks_decoded > 0
    left = {p.name.split(".")[0] for p in private(shm).iterdir()}
    assert left == {present(logit_feed(reader.feed)._shared).name}
    assert not left & stale


#: Damage to one file of a table: which file, where (a fraction of its size) and how.
DAMAGE = st.tuples(
    st.sampled_from(["json", "logits.npy"]),
    st.floats(min_value=0, max_value=1, exclude_max=True),
    st.one_of(
        st.tuples(st.just("flip"), st.integers(1, 255)),
        st.tuples(st.just("truncate"), st.just(0)),
        st.tuples(st.just("append"), st.integers(0, 255)),
    ),
)


@pytest.fixture(scope="module")
def held(tmp_path_factory):
    """The small store's shared table, kept mapped by one reader for every example."""
    root = tmp_path_factory.mktemp("fuzz-shm")
    saved = os.environ.get(SHARED_DIR_ENV)
    os.environ[SHARED_DIR_ENV] = str(root)
    os.environ.pop(PRIVATE_ENV, None)
    path = tmp_path_factory.mktemp("fuzz-store") / "s.zarr"
    make_store(path, 40, 5)
    keeper = open_store(path)
    keeper.feed.load(shared=True)
    yield path, keeper.read_dense(np.arange(40)).numpy(), present(logit_feed(keeper.feed)._shared)
    present(logit_feed(keeper.feed)._shared).close()
    if saved is None:
        os.environ.pop(SHARED_DIR_ENV)
    else:
        os.environ[SHARED_DIR_ENV] = saved


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(damage=DAMAGE)
def test_a_damaged_table_is_rebuilt_or_refused_never_used(held, damage):
    path, expected, table = held
    which, where, (how, value) = damage
    file = table.folder / f"{table.name}.{which}"
    content = bytearray(file.read_bytes())
    at = int(where * len(content))
    if how == "flip":
        content[at] ^= value
    elif how == "truncate":
        del content[at:]
    else:
        content.insert(at, value)
    with open(file, "r+b") as stream:  # in place, as damage would be
        stream.write(bytes(content))
        stream.truncate()
    reader = open_store(path)
    refused, rows = None, None
    try:
        rows = shared_rows(reader)
    except KdcacheError as error:
        refused = str(error)
    finally:
        shared = logit_feed(reader.feed)._shared
        if shared is not None:
            shared.close()
    if refused is None:
        np.testing.assert_array_equal(rows, expected)
    else:
        assert "\n" not in refused


READER = """
import json, os, resource, sys, time
from pathlib import Path
from kdcache.store.read.reader import open_store

store, shared, gate, count = sys.argv[1], sys.argv[2] == "1", Path(sys.argv[3]), int(sys.argv[4])
reader = open_store(store)
reader.feed.load(shared=shared)
total = sum(float(t.reshape(-1)[:: 4096 // t.itemsize].sum()) for t in reader.feed._tables.values())
(gate / str(os.getpid())).touch()
while len(list(gate.iterdir())) < count:  # measure while every reader holds its table
    time.sleep(0.01)
table = {"Rss": 0, "Pss": 0, "Private_Clean": 0, "Private_Dirty": 0}
current = ""
for line in Path("/proc/self/smaps").read_text().splitlines():
    parts = line.split()
    if "-" in parts[0] and not parts[0].endswith(":"):
        current = parts[-1] if len(parts) >= 6 else ""
    elif parts[0][:-1] in table and "kdcache-" in current:
        table[parts[0][:-1]] += int(parts[1]) * 1024
print(json.dumps(table))
time.sleep(0.5)  # let the other readers measure before this one unmaps
"""


def test_two_processes_hold_one_table_not_two(tmp_path):
    num_samples, num_classes = 8_000, 1000  # 16 MB of float16
    make_store(tmp_path / "s.zarr", num_samples, num_classes)
    nbytes = num_samples * num_classes * 2
    gate = tmp_path / "gate"
    gate.mkdir()
    env = cli_environment({SHARED_DIR_ENV: str(tmp_path / "shm")})
    readers = [
        subprocess.Popen(
            [sys.executable, "-c", READER, str(tmp_path / "s.zarr"), "1", str(gate), "2"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    reports = []
    for process in readers:
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr
        reports.append(json.loads(stdout))
    for report in reports:
        assert report["Rss"] == pytest.approx(nbytes, rel=0.02)  # all of it mapped...
        assert report["Private_Clean"] + report["Private_Dirty"] < nbytes / 10  # ...not private
    # Proportional set size: the node holds the table once, not once per reader.
    assert sum(r["Pss"] for r in reports) == pytest.approx(nbytes, rel=0.05)
    assert not list((tmp_path / "shm").glob("*/*.npy"))  # the last reader removed it
