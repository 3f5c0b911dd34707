"""``srpo_core._dispatch.pick_backend``: the one backend choice every public op makes."""

from __future__ import annotations

import pytest
import torch

from srpo_core import _dispatch

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # a device object only: nothing is allocated on it


@pytest.fixture
def no_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.fixture
def triton_imports(monkeypatch):
    monkeypatch.setattr(_dispatch, "_TRITON_IMPORTABLE", True)


def test_backends_are_the_four_names():
    assert _dispatch.BACKENDS == ("auto", "triton", "torch", "reference")


@pytest.mark.parametrize("device", [CPU, CUDA], ids=["cpu", "cuda"])
@pytest.mark.parametrize("has_triton", [True, False], ids=["kernel", "no-kernel"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_reference_and_torch_are_taken_as_asked(backend, dtype, has_triton, device, triton_imports):
    """Neither depends on the device, on a kernel existing, or on the dtype (float64 included)."""
    got = _dispatch.pick_backend(backend, device, op="op", has_triton=has_triton, dtypes={"x": dtype})
    assert got == backend


def test_auto_on_cpu_is_the_torch_path_even_under_the_interpreter(monkeypatch, triton_imports):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _dispatch.pick_backend("auto", CPU, op="op") == "torch"


def test_auto_on_cuda_takes_the_kernel_unless_float64_or_no_kernel(triton_imports):
    assert _dispatch.pick_backend("auto", CUDA, op="op", dtypes={"x": torch.bfloat16}) == "triton"
    assert _dispatch.pick_backend("auto", CUDA, op="op", dtypes={"x": torch.float64}) == "torch"
    assert _dispatch.pick_backend("auto", CUDA, op="op", has_triton=False) == "torch"


def test_auto_without_triton_is_the_torch_path(monkeypatch):
    monkeypatch.setattr(_dispatch, "_TRITON_IMPORTABLE", False)
    assert _dispatch.pick_backend("auto", CUDA, op="op") == "torch"


def test_triton_insists(no_interpreter, triton_imports, monkeypatch):
    assert _dispatch.pick_backend("triton", CUDA, op="op", dtypes={"x": torch.float16}) == "triton"
    with pytest.raises(TypeError, match=r"my_op: backend='triton' takes fp32/bf16/fp16 inputs, got `x` torch\.float64"):
        _dispatch.pick_backend("triton", CUDA, op="my_op", dtypes={"x": torch.float64})
    with pytest.raises(RuntimeError, match=r"my_op: backend='triton' needs CUDA tensors .* got tensors on cpu"):
        _dispatch.pick_backend("triton", CPU, op="my_op")
    with pytest.raises(NotImplementedError, match="my_op: no Triton kernel exists for this op"):
        _dispatch.pick_backend("triton", CUDA, op="my_op", has_triton=False)
    monkeypatch.setattr(_dispatch, "_TRITON_IMPORTABLE", False)
    with pytest.raises(RuntimeError, match="my_op: backend='triton' needs the `triton` package"):
        _dispatch.pick_backend("triton", CUDA, op="my_op")


def test_triton_on_cpu_under_the_interpreter(monkeypatch, triton_imports):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _dispatch.pick_backend("triton", CPU, op="op") == "triton"


@pytest.mark.parametrize("backend", ["cuda", "Reference", "", None, 1])
def test_unknown_backend_names_all_four(backend):
    with pytest.raises(ValueError, match=r"my_op: `backend` must be one of \('auto', 'triton', 'torch', 'reference'\)"):
        _dispatch.pick_backend(backend, CPU, op="my_op")
