"""Swapping a model directory in: the atomic Linux path, the two-rename fallback, recovery after a crash, and the
staging directory an export writes into (which `clipserve export` uses, so its tests need not re-export to check it)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from export import files


def _model(path: Path, content: str) -> Path:
    path.mkdir()
    (path / "manifest.json").write_text(content)
    (path / f"{content}.onnx").write_text(content)
    return path


def _contents(path: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in path.iterdir()}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2 is Linux's")
def test_on_linux_the_directories_are_swapped_in_one_step(tmp_path, monkeypatch):
    target = _model(tmp_path / "demo", "old")
    swaps = []
    real_exchange = files._exchange

    def counting(first: Path, second: Path) -> bool:
        swapped = real_exchange(first, second)
        swaps.append(swapped)
        return swapped

    monkeypatch.setattr(files, "_exchange", counting)
    files.replace_directory(_model(tmp_path / ".demo.staging-1", "new"), target)
    assert swaps == [True]  # the atomic path, not the two-rename fallback
    assert _contents(target) == {"manifest.json": "new", "new.onnx": "new"}
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]  # the old model is gone, nothing left over
    assert oct(target.stat().st_mode & 0o777) == "0o755"


def test_without_an_atomic_swap_two_renames_do_the_job(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "_exchange", lambda first, second: False)  # another OS or filesystem
    target = _model(tmp_path / "demo", "old")
    files.replace_directory(_model(tmp_path / ".demo.staging-1", "new"), target)
    assert _contents(target) == {"manifest.json": "new", "new.onnx": "new"}
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]


def test_a_failed_second_rename_puts_the_old_model_back(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "_exchange", lambda first, second: False)
    target = _model(tmp_path / "demo", "old")
    staging = _model(tmp_path / ".demo.staging-1", "new")
    real_rename = Path.rename

    def failing(self: Path, to: Path) -> Path:
        if self == staging:
            raise OSError("disk pulled")
        return real_rename(self, to)

    monkeypatch.setattr(Path, "rename", failing)
    with pytest.raises(OSError, match="disk pulled"):
        files.replace_directory(staging, target)
    assert _contents(target) == {"manifest.json": "old", "old.onnx": "old"}


def test_a_model_left_aside_by_a_crash_is_restored(tmp_path):
    # What a process killed between the fallback's two renames leaves: no model, the old one moved aside.
    retired = _model(tmp_path / ".demo.1a2b3c4d.retired", "old")
    target = tmp_path / "demo"
    assert files.restore_retired(target, must_contain="manifest.json") == target
    assert _contents(target) == {"manifest.json": "old", "old.onnx": "old"} and not retired.exists()
    assert files.restore_retired(target, must_contain="manifest.json") is None  # present now: nothing to do
    assert files.restore_retired(tmp_path / "other", must_contain="manifest.json") is None  # nothing aside for it


def test_only_a_complete_copy_of_the_same_model_is_restored(tmp_path):
    # Names may contain dots: "clip.v2"'s leftover must not become "clip".
    _model(tmp_path / ".clip.v2.1a2b3c4d.retired", "clip v2")
    # A copy whose deletion was under way when the crash came: its manifest is already gone.
    (tmp_path / ".clip.0badc0de.retired").mkdir()
    (tmp_path / ".clip.0badc0de.retired" / "image.onnx").write_text("half")
    assert files.restore_retired(tmp_path / "clip", must_contain="manifest.json") is None
    assert not (tmp_path / "clip").exists()


def test_an_exchange_error_other_than_unsupported_is_raised(tmp_path):
    if not sys.platform.startswith("linux"):
        pytest.skip("renameat2 is Linux's")
    with pytest.raises(FileNotFoundError):
        files._exchange(tmp_path / "missing", _model(tmp_path / "demo", "old"))
    assert os.path.isdir(tmp_path / "demo")


def test_a_completed_staging_directory_replaces_the_model_and_leaves_nothing_of_the_old_one(tmp_path):
    target = _model(tmp_path / "demo", "old")
    (target / "stale.txt").write_text("from an older export")
    with files.staged_directory(target, must_contain="manifest.json") as staging:
        assert staging.parent == tmp_path and staging.name.startswith(".demo.staging-") and not any(staging.iterdir())
        (staging / "manifest.json").write_text("new")
    assert _contents(target) == {"manifest.json": "new"}
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]


def test_a_failed_run_keeps_the_previous_model_and_leaves_no_staging(tmp_path):
    target = _model(tmp_path / "demo", "old")
    with (
        pytest.raises(RuntimeError, match="parity gate failed"),
        files.staged_directory(target, "manifest.json") as staging,
    ):
        (staging / "manifest.json").write_text("new")
        raise RuntimeError("parity gate failed")
    assert _contents(target) == {"manifest.json": "old", "old.onnx": "old"}
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]


def test_staging_first_restores_a_model_left_aside_and_clears_day_old_leftovers(tmp_path):
    # As a crash between the fallback's two renames leaves it: the old model moved aside, none in place.
    _model(tmp_path / ".demo.0badc0de.retired", "old")
    killed = _model(tmp_path / ".demo.staging-0000dead", "killed")
    os.utime(killed, (0, 0))  # a day old at least: its run is over
    running = _model(tmp_path / ".demo.staging-0000beef", "running")  # may belong to an export still going
    said: list[str] = []
    with files.staged_directory(tmp_path / "demo", "manifest.json", progress=said.append) as staging:
        assert _contents(tmp_path / "demo") == {"manifest.json": "old", "old.onnx": "old"}
        (staging / "manifest.json").write_text("new")
    assert said == ["restored demo from an export that was interrupted while swapping it in"]
    assert _contents(tmp_path / "demo") == {"manifest.json": "new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [running.name, "demo"]
