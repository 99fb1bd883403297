"""Temporary files and folders that nobody can plant: real files in a real folder."""

from __future__ import annotations

import os

import pytest

from kdcache.errors import PathInTheWayError
from kdcache.temporaries import TemporaryFile, create_folder, own_folder_exists


def test_a_temporary_file_is_published_whole_and_a_killed_runs_leftover_is_replaced(tmp_path):
    leftover = tmp_path / "out.bin.tmp"
    leftover.write_bytes(b"half of an old write")
    with TemporaryFile.create(leftover, purpose="a test file") as temporary:
        temporary.stream.write(b"new")
        temporary.publish(tmp_path / "out.bin")
    assert (tmp_path / "out.bin").read_bytes() == b"new"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out.bin"]


def test_a_failed_write_leaves_nothing_behind(tmp_path):
    with pytest.raises(RuntimeError), TemporaryFile.create(tmp_path / "x.tmp", purpose="x"):
        raise RuntimeError("the writer failed")
    assert not list(tmp_path.iterdir())


def test_nothing_planted_at_a_temporary_path_is_written_through_or_deleted(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("secret")
    (tmp_path / "link.tmp").symlink_to(victim)
    (tmp_path / "dangling.tmp").symlink_to(tmp_path / "nowhere")
    (tmp_path / "folder.tmp").mkdir()
    os.link(victim, tmp_path / "hard.tmp")
    os.mkfifo(tmp_path / "fifo.tmp")
    for name, found in [
        ("link.tmp", "a symbolic link"),
        ("dangling.tmp", "a symbolic link"),
        ("folder.tmp", "a folder"),
        ("hard.tmp", "a file with 2 hard links"),
        ("fifo.tmp", "a special file"),
    ]:
        with pytest.raises(PathInTheWayError, match=f"is {found}.*move it away") as error:
            TemporaryFile.create(tmp_path / name, purpose="a test file")
        assert "\n" not in str(error.value)
    assert victim.read_text() == "secret"
    assert not (tmp_path / "nowhere").exists()
    assert (tmp_path / "link.tmp").is_symlink()
    assert (tmp_path / "folder.tmp").is_dir()


def test_a_temporary_file_another_process_is_writing_is_left_alone(tmp_path):
    with TemporaryFile.create(tmp_path / "x.tmp", purpose="x") as first:
        first.stream.write(b"busy")
        with pytest.raises(PathInTheWayError, match="being written by another running process"):
            TemporaryFile.create(tmp_path / "x.tmp", purpose="x")
        first.publish(tmp_path / "x")
    assert (tmp_path / "x").read_bytes() == b"busy"


def test_a_temporary_replaced_midway_is_not_published(tmp_path):
    temporary = TemporaryFile.create(tmp_path / "x.tmp", purpose="x")
    (tmp_path / "x.tmp").unlink()
    (tmp_path / "x.tmp").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(PathInTheWayError, match="replaced by another process"):
        temporary.publish(tmp_path / "x")
    assert not (tmp_path / "x").exists()
    assert (tmp_path / "x.tmp").is_symlink()


def test_temporary_folders_are_created_exclusively_and_links_are_refused(tmp_path):
    assert not own_folder_exists(tmp_path / "new", purpose="a folder")
    create_folder(tmp_path / "new", purpose="a folder")
    assert own_folder_exists(tmp_path / "new", purpose="a folder")
    with pytest.raises(PathInTheWayError, match="is a folder"):
        create_folder(tmp_path / "new", purpose="a folder")
    (tmp_path / "link").symlink_to(tmp_path / "new")
    (tmp_path / "file").write_text("")
    for name, found in [("link", "a symbolic link"), ("file", "a file")]:
        with pytest.raises(PathInTheWayError, match=found):
            own_folder_exists(tmp_path / name, purpose="a folder")
        with pytest.raises(PathInTheWayError, match=found):
            create_folder(tmp_path / name, purpose="a folder")


def test_every_atomic_write_of_a_run_refuses_a_link_planted_at_its_temporary(tmp_path):
    from kdcache.plots.figures import new_figure, save_figure
    from kdcache.run_folder import atomic_torch_save, prepare_output_dir
    from kdcache.train.sweep import write_results_csv

    victim = tmp_path / "victim.txt"
    victim.write_text("secret")
    run = tmp_path / "run"
    run.mkdir()
    writes = {
        ".kdcache-write-test": lambda: prepare_output_dir(run, overwrite=False),
        "last.pt.tmp": lambda: atomic_torch_save({"step": 1}, run / "last.pt"),
        "loss.png.tmp": lambda: save_figure(new_figure(width=2, height=2), run / "loss.png"),
        "results.csv.tmp": lambda: write_results_csv([], run / "results.csv"),
    }
    for temporary, write in writes.items():
        (run / temporary).symlink_to(victim)
        with pytest.raises(PathInTheWayError, match=f"{temporary}, .* is a symbolic link"):
            write()
        (run / temporary).unlink()
        write()  # with the link gone, the same write succeeds
    assert victim.read_text() == "secret"
    assert sorted(path.name for path in run.iterdir()) == ["last.pt", "loss.png", "results.csv"]
