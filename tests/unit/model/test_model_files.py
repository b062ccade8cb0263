"""Files that are not a model batchcam can run: each refused with one line (the file, what it is, what to
do), never a traceback, a key dump or torch's own advice; read bounded and never blocking."""
from __future__ import annotations

import io
import os
import threading
import zipfile
from pathlib import Path

import pytest
import torch

from batchcam.errors import CheckpointError, UsageError
from batchcam.model.checkpoint import load_checkpoint, save_calibrated
from batchcam.model.reading import MAX_MODEL_MB, read_model_file

TORCH_INTERNALS = ("Traceback", "WeightsUnpickler", "add_safe_globals", "weights_only", "\x1b", "Error(s) in loading")


def refusal_of(path: Path, **kwargs) -> str:
    with pytest.raises(CheckpointError) as refusal:
        load_checkpoint(path, **kwargs)
    message = str(refusal.value)
    assert isinstance(refusal.value, UsageError)          # exit 2
    assert message.startswith(f"{path}: ") and "\n" not in message
    assert not any(internal in message for internal in TORCH_INTERNALS), message
    return message.removeprefix(f"{path}: ")


@pytest.mark.parametrize("text", ["not a checkpoint\n", "{\"weights\": [1, 2]}\n", "a,b\n1,2\n"])
def test_a_text_file_is_not_a_pytorch_model(tmp_path, text):
    (tmp_path / "model.pt").write_text(text)
    assert refusal_of(tmp_path / "model.pt") == ("not a PyTorch model file (neither a torch.save zip archive nor a "
                                                 "legacy torch.save file)")


def test_an_empty_file_is_not_a_model(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    assert refusal_of(tmp_path / "empty.pt") == "an empty file (0 bytes), not a PyTorch model"


def test_a_zip_archive_that_is_not_torchs_is_refused(tmp_path):
    with zipfile.ZipFile(tmp_path / "model.pt", "w") as archive:
        archive.writestr("weights/readme.txt", "not a model")
    assert refusal_of(tmp_path / "model.pt") == "a zip archive that is not a PyTorch model (it holds no data.pkl)"


def test_a_truncated_checkpoint_is_damaged_not_a_traceback(tmp_path):
    buffer = io.BytesIO()
    torch.save({"state_dict": {"conv1.weight": torch.zeros(64, 3, 7, 7)}}, buffer)
    (tmp_path / "cut.pt").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    assert "damaged" in refusal_of(tmp_path / "cut.pt")


def test_dev_null_is_not_a_regular_file():
    assert refusal_of(Path("/dev/null")) == "not a regular file (a character device), so not a model file"


def test_a_folder_is_not_a_model_file(tmp_path):
    assert refusal_of(tmp_path) == "not a regular file (a folder), so not a model file"


def test_a_missing_file_is_named():
    assert refusal_of(Path("/nonexistent/model.pt")) == "no such model file"


def test_a_fifo_is_refused_at_once_instead_of_waiting_for_a_writer(tmp_path):
    """On a thread with a deadline: a blocking open of a FIFO with no writer would never return (the
    thread is a daemon, so a regression fails this test instead of hanging the suite)."""
    fifo = tmp_path / "model.pt"
    os.mkfifo(fifo)
    said: list[str] = []
    reader = threading.Thread(target=lambda: said.append(refusal_of(fifo)), daemon=True)
    reader.start()
    reader.join(60)
    assert not reader.is_alive(), "load_checkpoint blocked on a FIFO"
    assert said == ["not a regular file (a FIFO), so not a model file"]


def test_a_file_over_the_size_limit_is_refused_before_it_is_read(tmp_path):
    huge = tmp_path / "huge.pt"
    with open(huge, "wb") as f:
        f.truncate((MAX_MODEL_MB + 1) * 2 ** 20)   # sparse: nothing to read, and nothing must be read
    assert refusal_of(huge) == f"{MAX_MODEL_MB + 1} MiB, larger than the {MAX_MODEL_MB} MiB a model file may have"


def test_the_size_limit_is_the_callers(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"\x80" * 4096)
    assert refusal_of(tmp_path / "model.pt", max_bytes=1024) == ("4096 bytes, larger than the 1024 bytes a model file "
                                                                 "may have")


def test_the_digest_is_of_the_bytes_read(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"abc")
    import hashlib

    assert read_model_file(tmp_path / "model.pt").sha256 == hashlib.sha256(b"abc").hexdigest()


def test_a_pickle_of_something_else_says_what_it_holds(tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.pt")
    assert refusal_of(tmp_path / "list.pt") == "holds a list, not a state dict or a training checkpoint"


def test_a_dict_without_weights_names_its_keys_and_where_weights_were_looked_for(tmp_path):
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}, "history": [0.5, 0.4]}, tmp_path / "ckpt.pt")
    assert refusal_of(tmp_path / "ckpt.pt") == ("a dict (keys epoch, optimizer, history) with no state dict under "
                                                "model_state_dict, state_dict, model, net or weights")


def test_class_names_that_number_their_classes_wrongly_are_refused(tmp_path):
    torch.save({"state_dict": {"a.weight": torch.zeros(1)}, "class_to_idx": {"NORMAL": 0, "PNEUMONIA": 2}},
               tmp_path / "ckpt.pt")
    assert refusal_of(tmp_path / "ckpt.pt").startswith("its 'class_to_idx' is not a list of class names nor a mapping "
                                                       "numbering them 0..N-1")


def test_save_calibrated_refuses_a_source_it_cannot_read_without_writing(tmp_path):
    (tmp_path / "notes.pt").write_text("hello\n")
    with pytest.raises(CheckpointError, match="notes.pt: not a PyTorch model file"):
        save_calibrated(tmp_path / "notes.pt", tmp_path / "out.pt", 1.0, None)
    assert not (tmp_path / "out.pt").exists()
