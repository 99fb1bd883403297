"""dump-teacher under SIGKILL, a full disk, a second writer and a misbehaving teacher (real
subprocesses)."""

from __future__ import annotations

import resource
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import assert_one_line_error, run_cli, start_cli
from narrowing import kdcache_record, stored, zarr_array
from older_stores import as_previous_release

from kdcache import DumpConfig, open_store
from kdcache.data.datasets import build_dataset
from kdcache.dump.teacher import dump_teacher
from kdcache.errors import (
    ConfigError,
    InvalidLogitsError,
    StoreIncompleteError,
    StoreMismatchError,
)
from kdcache.store.ranks.partition import dump_batches
from kdcache.store.tools.verify import verify_store

DATASET = "fake:200:8:10"
NUM_CHUNKS = 10
# 15 does not divide the 20-row chunks, so resumed batches straddle written and pending chunks.
DUMP = (
    "dump-teacher",
    "--dataset",
    DATASET,
    "--chunk-rows",
    "20",
    "--batch-size",
    "15",
    "--encoding",
    "float32",
    "--device",
    "cpu",
)


def written_flags(store: Path) -> int:
    flags = store / "chunk_written" / "c"
    return sum(1 for p in flags.iterdir() if p.name.isdigit()) if flags.is_dir() else 0


def store_contents(store: Path) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(store), mode="r")
    return {name: stored(group, name) for name in ("logits", "labels", "chunk_written")}


def assert_same_store(store: Path, reference: Path) -> None:
    got, expected = store_contents(store), store_contents(reference)
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    attributes = [kdcache_record(zarr.open_group(str(s), mode="r")) for s in (store, reference)]
    for record in attributes:
        record.pop("created_at")
        assert len(record.pop("generation")) == 32  # each store's own identity, like created_at
        # The fidelity estimate samples the rows computed by the run that finished the store.
        assert record.pop("fidelity")["top1_agreement"] == 1.0
    assert attributes[0] == attributes[1]
    assert not list(store.rglob("*.partial"))


@pytest.fixture(scope="module")
def reference_store(tmp_path_factory) -> Path:
    """The same dump, never interrupted."""
    out = tmp_path_factory.mktemp("reference") / "t.zarr"
    dump_teacher(dump_config(out))
    return out


def dump_config(out: Path, **changes) -> DumpConfig:
    """The Python equivalent of DUMP with the seeded teacher (same logits as teachers:slow)."""
    options = dict(
        teacher="teachers:slow",
        dataset=DATASET,
        chunk_rows=20,
        batch_size=15,
        encoding="float32",
        device="cpu",
        out=str(out),
    )
    return DumpConfig(**{**options, **changes})


def wait_for(process: subprocess.Popen, condition, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, (
            f"dump ended before the kill point:\n{process.communicate()[1]}"
        )
        assert time.monotonic() < deadline, "kill point never reached"
        time.sleep(0.002)


@pytest.mark.parametrize("kill_after_chunks", [0, 1, 6])
def test_a_sigkilled_dump_reports_incomplete_and_resumes_bit_identical(
    tmp_path, reference_store, kill_after_chunks
):
    out, gate = tmp_path / "t.zarr", tmp_path / "gate"
    if kill_after_chunks == 0:
        # the teacher waits before its first batch: kill during or right after creation
        gate.touch()
    process = start_cli(
        *DUMP, "--teacher", "teachers:slow", "--out", str(out), env={"KDCACHE_TEST_GATE": str(gate)}
    )
    if kill_after_chunks == 0:
        wait_for(process, lambda: (out / "zarr.json").exists())
    else:
        wait_for(process, lambda: written_flags(out) >= kill_after_chunks)
        gate.touch()  # hold the dump (at most a batch later) so it cannot finish before the kill
    if kill_after_chunks == 1:
        second = run_cli(
            *DUMP, "--teacher", "teachers:slow", "--out", str(out), "--resume", check=False
        )
        assert_one_line_error(second, "being written by another writer", f"pid {process.pid} ")
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL

    done = written_flags(out)
    assert kill_after_chunks <= done < NUM_CHUNKS
    with pytest.raises(
        StoreIncompleteError, match=f"{done} of {NUM_CHUNKS} chunks \\({20 * done} of 200 samples"
    ):
        open_store(out)
    assert (
        verify_store(out).problems[0].startswith(f"unfinished dump: {done} of {NUM_CHUNKS} chunks")
    )
    if kill_after_chunks == 1:
        refused = run_cli(
            "distill",
            "--student",
            "mlp:8",
            "--cache",
            str(out),
            "--out",
            str(tmp_path / "run"),
            check=False,
        )
        assert_one_line_error(refused, "unfinished dump", "--resume")
        assert not (tmp_path / "run" / "last.pt").exists()

    resumed = dump_teacher(dump_config(out, resume=True))
    assert resumed.rows_computed == 200 - 20 * done
    assert_same_store(out, reference_store)


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    try:
        return (
            subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                capture_output=True,
            ).returncode
            == 0
        )
    except FileNotFoundError:  # no mount binary
        return False


def _limit_file_size() -> None:
    # Writes past 2 KiB fail with EFBIG (instead of the default SIGXFSZ kill): the first
    # 100-row logits chunk no longer fits, while the small metadata files still do.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))


def test_a_full_disk_stops_the_dump_in_one_line_and_resume_completes_it(tmp_path, reference_store):
    disk = tmp_path / "disk"
    if _mount_tmpfs(disk, "48k"):  # a real full filesystem, when mounting is allowed (root)
        out = disk / "t.zarr"
        dump = [*DUMP, "--teacher", "teachers:seeded", "--out", str(out)]
        try:
            full = run_cli(*dump, check=False)
            assert_one_line_error(full, "No space left on device", "--resume")
            assert 0 < written_flags(out) < NUM_CHUNKS  # it stopped midway
            subprocess.run(["mount", "-o", "remount,size=4m", str(disk)], check=True)
            dump_teacher(dump_config(out, teacher="teachers:seeded", resume=True))
            np.testing.assert_array_equal(
                store_contents(out)["logits"], store_contents(reference_store)["logits"]
            )
        finally:
            subprocess.run(["umount", str(disk)], check=True)
        return
    out = tmp_path / "t.zarr"
    dump = [*DUMP, "--teacher", "teachers:seeded", "--out", str(out)]
    dump[dump.index("20")] = "100"  # two 4 KB chunks
    full = run_cli(*dump, check=False, preexec_fn=_limit_file_size)
    assert_one_line_error(full, "File too large", "--resume")
    with pytest.raises(StoreIncompleteError, match="0 of 2 chunks"):
        open_store(out)
    dump_teacher(dump_config(out, teacher="teachers:seeded", chunk_rows=100, resume=True))
    np.testing.assert_array_equal(
        store_contents(out)["logits"], store_contents(reference_store)["logits"]
    )


def test_nan_logits_stop_the_dump_naming_the_samples_and_leave_it_resumable(tmp_path):
    dataset = build_dataset(DATASET)
    brightness = np.array([dataset[i][0].mean().item() for i in range(len(dataset))])
    threshold = float(np.sort(brightness)[-4])  # three samples are brighter
    bright = np.flatnonzero(brightness > threshold)
    batches = dump_batches(np.arange(200), num_samples=200, chunk_rows=20, batch_size=15)
    failing = next(batch for batch in batches if bright[0] in batch)
    named = [i for i in bright if i in failing]
    out = tmp_path / "t.zarr"
    result = run_cli(
        *DUMP,
        "--teacher",
        "teachers:nan_for_bright",
        "--out",
        str(out),
        check=False,
        env={"KDCACHE_TEST_BRIGHT": repr(threshold)},
    )
    assert_one_line_error(result, f"NaN or Inf for samples {', '.join(map(str, named))};")
    done = written_flags(out)
    assert done == failing[0] // 20  # the chunks before the failing batch
    with pytest.raises(StoreIncompleteError, match=f"{done} of {NUM_CHUNKS} chunks"):
        open_store(out)


def test_a_teacher_of_the_wrong_width_stops_the_dump(tmp_path):
    with pytest.raises(
        InvalidLogitsError,
        match=r"expected logits of shape \(15, 10\) for samples 0-14, got \(15, 11\)",
    ):
        dump_teacher(
            DumpConfig(
                teacher="teachers:too_wide",
                dataset=DATASET,
                chunk_rows=20,
                batch_size=15,
                out=str(tmp_path / "t.zarr"),
                device="cpu",
            )
        )
    assert (
        open_store(tmp_path / "t.zarr", allow_incomplete=True)
        .progress()
        .startswith("0 of 10 chunks")
    )


def test_a_teacher_beyond_float16_stops_the_dump_in_one_line_and_keeps_the_old_store(tmp_path):
    out = tmp_path / "t.zarr"
    dump_teacher(
        DumpConfig(
            teacher="teachers:seeded",
            dataset="fake:40:8:10",
            encoding="float16",
            out=str(out),
            device="cpu",
        )
    )
    before = store_contents(out)
    result = run_cli(
        "dump-teacher",
        *("--dataset", "fake:40:8:10", "--encoding", "float16", "--device", "cpu"),
        *("--teacher", "teachers:loud", "--out", str(out), "--overwrite"),
        check=False,
    )
    assert_one_line_error(result, "overflow the encoding float16", "--encoding float32")
    for name, values in store_contents(out).items():
        np.testing.assert_array_equal(values, before[name], err_msg=name)
    assert verify_store(out).ok
    fresh = tmp_path / "fresh.zarr"
    with pytest.raises(InvalidLogitsError, match="overflow the encoding float16"):
        dump_teacher(
            DumpConfig(
                teacher="teachers:loud",
                dataset="fake:40:8:10",
                encoding="float16",
                out=str(fresh),
                device="cpu",
            )
        )
    with pytest.raises(StoreIncompleteError):
        open_store(fresh)  # never finalized with rows its readers would refuse


def test_a_dump_with_several_writer_threads_equals_one_with_one(tmp_path, reference_store):
    result = dump_teacher(dump_config(tmp_path / "t.zarr", writer_workers=3))
    assert_same_store(tmp_path / "t.zarr", reference_store)
    assert (
        result.fidelity
        == dump_teacher(dump_config(tmp_path / "one.zarr", writer_workers=1)).fidelity
    )
    with pytest.raises(
        ConfigError, match="--writer-workers must be an integer from 1 to 1,024, got 0"
    ):
        dump_config(tmp_path / "x.zarr", writer_workers=0)


def test_ctrl_c_says_how_to_resume_and_leaves_the_store_resumable(tmp_path, reference_store):
    out = tmp_path / "t.zarr"
    process = start_cli(
        *DUMP,
        "--teacher",
        "teachers:slow",
        "--out",
        str(out),
        env={"KDCACHE_PROGRESS_SECONDS": "0.01"},  # progress lines, as in a log, from the start
    )
    wait_for(process, lambda: written_flags(out) >= 2)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr
    assert "Aborted!" not in stderr
    assert lines[-1].startswith(f"Interrupted: {out} keeps the chunks written so far")
    assert "--resume" in lines[-1]
    assert any(line.startswith("dump: ") and "sample/s" in line for line in lines), stderr
    done = written_flags(out)
    assert 2 <= done < NUM_CHUNKS
    resumed = dump_teacher(dump_config(out, resume=True))
    assert resumed.rows_computed == 200 - 20 * done
    assert_same_store(out, reference_store)


def test_out_of_range_options_are_named_as_on_the_command_line(tmp_path):
    with pytest.raises(
        ConfigError, match=r"^--num-workers must be an integer from 0 to 1,024, got -1$"
    ):
        dump_config(tmp_path / "x.zarr", num_workers=-1)
    with pytest.raises(ConfigError, match=r"^--chunk-rows must be >= 1, got 0$"):
        dump_config(tmp_path / "x.zarr", chunk_rows=0)


def test_resume_with_another_batch_size_is_refused_unless_the_store_predates_the_record(
    tmp_path, reference_store
):
    out = tmp_path / "t.zarr"
    shutil.copytree(reference_store, out)
    group = zarr.open_group(str(out), mode="r+")
    zarr_array(group, "chunk_written")[5:] = 0  # the dump stopped after 5 of its 10 chunks
    group.attrs["kdcache"] = {**kdcache_record(group), "complete": False}
    before = store_contents(out)
    # Its rows came from batches of 15; batches of 16 would differ in the last bits.
    with pytest.raises(
        StoreMismatchError, match=r"cannot resume .*teacher\.batch_size is 15 but this dump has 16"
    ):
        dump_teacher(dump_config(out, batch_size=16, resume=True))
    for name, values in store_contents(out).items():
        np.testing.assert_array_equal(values, before[name], err_msg=name)
    # A store dumped before batch sizes were recorded cannot tell: it resumes as it always did.
    teacher = dict(kdcache_record(group)["teacher"])
    del teacher["batch_size"]
    as_previous_release(out, teacher=teacher)
    assert dump_teacher(dump_config(out, batch_size=16, resume=True)).rows_computed == 100
