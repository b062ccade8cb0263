"""SafeDir against what someone plants at a name batchcam writes or reads: a link is replaced or refused,
never written through; a FIFO is replaced or refused, never waited on; a file already there is never
replaced by a write that must not replace it."""
from __future__ import annotations

import os
import threading

import pytest

from batchcam.runtime.fsutil import PlantedLink, SafeDir, publish_new, temporary_name, temporary_of


def within_seconds(call, seconds: float = 10.0):
    """``call()``, failing instead of hanging when it blocks (a FIFO opened for writing waits for a reader)."""
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except BaseException as e:
            outcome["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "blocked on what was planted"
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


@pytest.fixture
def victim(tmp_path):
    """A file outside the folder that a planted link points at."""
    path = tmp_path / "victim.txt"
    path.write_text("precious")
    return path


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "report").mkdir()
    with SafeDir.open(tmp_path / "report") as opened:
        yield opened


def test_an_atomic_write_replaces_a_planted_link_and_leaves_its_target_alone(folder, victim):
    os.symlink(victim, folder.path / "predictions.csv")
    folder.write_bytes("predictions.csv", b"path,status\n")
    assert not (folder.path / "predictions.csv").is_symlink()
    assert (folder.path / "predictions.csv").read_bytes() == b"path,status\n"
    assert victim.read_text() == "precious"


def plant(planted: str, target, victim) -> None:
    """A link to ``victim`` or a FIFO at ``target``: what an attacker leaves where batchcam writes or reads."""
    if planted == "link":
        os.symlink(victim, target)
    else:
        os.mkfifo(target)


@pytest.mark.parametrize("planted", ["link", "fifo"])
def test_appending_replaces_a_planted_link_or_fifo_by_a_file_of_its_own(planted, folder, victim):
    target = folder.path / "batchcam.log"
    plant(planted, target, victim)
    log = within_seconds(lambda: folder.open_append("batchcam.log", encoding="utf-8"))
    with log:
        log.write("run started\n")
    assert target.is_file() and not target.is_symlink()
    assert target.read_text() == "run started\n"
    assert victim.read_text() == "precious"


@pytest.mark.parametrize("planted", ["link", "fifo"])
def test_reading_a_planted_link_or_fifo_gives_nothing_and_never_waits(planted, folder, victim):
    target = folder.path / "manifest.json"
    plant(planted, target, victim)
    assert within_seconds(lambda: folder.read_bytes("manifest.json")) is None
    assert folder.read_text("missing.json") is None


@pytest.mark.parametrize("planted", ["link", "fifo"])
def test_opening_an_existing_file_for_writing_refuses_a_link_or_fifo(planted, folder, victim):
    target = folder.path / "reviews.csv"
    plant(planted, target, victim)
    with pytest.raises(OSError):
        within_seconds(lambda: folder.open_existing("reviews.csv"))
    assert victim.read_text() == "precious"


def test_a_planted_link_in_place_of_a_subfolder_is_replaced_or_refused_never_followed(folder, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.symlink(elsewhere, folder.path / "overlays")
    os.symlink(elsewhere, folder.path / ".batchcam")
    with pytest.raises(PlantedLink, match="refusing to write through it"):
        folder.subdir(".batchcam", replace_link=False)
    with folder.subdir("overlays") as overlays:
        overlays.write_bytes("a.jpg", b"jpeg")
    assert (folder.path / "overlays").is_dir() and not (folder.path / "overlays").is_symlink()
    assert list(elsewhere.iterdir()) == []


def test_a_plain_file_in_place_of_a_subfolder_is_an_error_and_stays(folder):
    (folder.path / "gallery").write_text("someone's notes")
    with pytest.raises(NotADirectoryError):
        folder.subdir("gallery")
    assert (folder.path / "gallery").read_text() == "someone's notes"


def test_create_and_publish_new_never_replace_what_is_there(folder, victim):
    (folder.path / "taken").write_text("mine")
    os.symlink(victim, folder.path / "linked")
    with pytest.raises(FileExistsError):
        folder.create("taken")
    assert not publish_new(folder.path, "taken", b"new")
    assert not publish_new(folder.path, "linked", b"new")
    assert (folder.path / "taken").read_text() == "mine" and victim.read_text() == "precious"
    assert sorted(os.listdir(folder.path)) == ["linked", "taken"]   # no temporary left behind


def test_unlink_removes_a_link_never_its_target(folder, victim):
    os.symlink(victim, folder.path / "overlay.jpg")
    assert folder.unlink("overlay.jpg") and victim.read_text() == "precious"
    assert not folder.unlink("overlay.jpg")


def test_a_temporary_name_is_hidden_random_and_tells_which_file_it_is_for():
    first, second = temporary_name("predictions.csv"), temporary_name("predictions.csv")
    assert first != second and first.startswith(".predictions.csv.") and first.endswith(".tmp")
    assert temporary_of(first) == "predictions.csv"
    assert temporary_of(".predictions.csv.tmp1234") is None and temporary_of("predictions.csv") is None


def test_an_error_names_the_full_path_not_only_the_name(folder):
    with pytest.raises(FileNotFoundError) as missing:
        folder.subdir("absent", create=False)
    assert missing.value.filename == str(folder.path / "absent")
