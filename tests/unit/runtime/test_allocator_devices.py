"""The allocator's tuning is harmless where there is no glibc, and the device and precision are resolved
once: ``auto`` is what this machine has, anything it cannot run is a one-line usage error."""
from __future__ import annotations

import ctypes

import pytest
import torch

from batchcam.errors import UsageError
from batchcam.runtime import allocator
from batchcam.runtime.devices import precision_name, resolve_device, resolve_precision

# ------------------------------------------------------------------ allocator


def test_releasing_and_keeping_freed_memory_are_callable_and_leave_memory_usable():
    assert isinstance(allocator.release_freed_memory(), bool)
    assert isinstance(allocator.keep_freed_memory(), bool)
    big = bytearray(64 * 2 ** 20)
    del big
    allocator.release_freed_memory()
    assert torch.ones(1024, 1024).sum().item() == 1024 * 1024


@pytest.mark.parametrize("missing", [OSError("no libc here"), AttributeError("no malloc_trim in musl")])
def test_without_glibc_both_say_false_and_raise_nothing(missing, monkeypatch):
    def no_glibc(name):
        if isinstance(missing, OSError):
            raise missing
        return object()  # a library without mallopt or malloc_trim

    monkeypatch.setattr(ctypes, "CDLL", no_glibc)
    assert allocator.release_freed_memory() is False
    assert allocator.keep_freed_memory() is False


def test_a_process_that_kept_freed_memory_still_runs_model_batches():
    allocator.keep_freed_memory()   # as every command does first (cli.main)
    weights = torch.randn(16, 3, 3, 3)
    sums = [torch.nn.functional.conv2d(torch.ones(8, 3, 64, 64), weights).sum().item() for _ in range(3)]
    allocator.release_freed_memory()
    assert sums[0] == sums[1] == sums[2]


# ------------------------------------------------------------------ devices and precision

def test_auto_is_the_cpu_without_cuda_and_cuda_with_it():
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("name, message", [
    ("tpu", "--device 'tpu' is not a device (use auto, cpu, cuda or cuda:N)"),
    ("", "--device '' is not a device"),
    ("meta", "--device 'meta': only auto, cpu, cuda and cuda:N are supported"),
    ("mps", "--device 'mps': only auto, cpu, cuda and cuda:N are supported"),
    ("cuda:99", "--device cuda:99: "),
])
def test_a_device_that_cannot_run_here_is_a_one_line_usage_error(name, message):
    with pytest.raises(UsageError) as refused:
        resolve_device(name)
    assert str(refused.value).startswith(message) and "\n" not in str(refused.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_without_cuda_is_refused_not_quietly_the_cpu():
    with pytest.raises(UsageError, match="^--device cuda: CUDA is not available on this machine$"):
        resolve_device("cuda")


def test_precision_on_the_cpu_is_float32_for_auto_and_what_was_asked_otherwise():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) is None
    assert [precision_name(resolve_precision(p, cpu)) for p in ("auto", "fp32", "bf16", "fp16")] == [
        "fp32", "fp32", "bf16", "fp16"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="auto's choice on CUDA needs a CUDA device")
def test_auto_precision_on_cuda_is_bf16_where_supported_else_fp16():
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    assert resolve_precision("auto", torch.device("cuda")) == expected


def test_an_unknown_precision_is_refused_by_the_command_line(tmp_path, capsys):
    from batchcam.cli import main

    (tmp_path / "xrays").mkdir()
    assert main(["scan", str(tmp_path / "xrays"), "--out", str(tmp_path / "report"), "--precision", "fp8"]) == 2
    assert "argument --precision: invalid choice: 'fp8'" in capsys.readouterr().err
    assert not (tmp_path / "report").exists()


def test_gpu_decoding_is_refused_where_it_cannot_run(tmp_path, xray_folder, tiny_model, capsys):
    from batchcam.cli import main

    out = tmp_path / "report"
    code = main(["scan", str(xray_folder), "--out", str(out), "--model", str(tiny_model), "--device", "cpu",
                 "--decode", "gpu", "--workers", "0"])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "batchcam: error: --decode gpu needs a CUDA device and the local engine (this run: device cpu, "
        "engine local)")
    assert not out.exists()
