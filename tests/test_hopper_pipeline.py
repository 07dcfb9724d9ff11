"""The Hopper forward's pipeline bookkeeping on the CPU: tests/hopper_pipeline_model.cpp runs
the kernel's own produce/consume loops and list walk (csrc/cuda/hopper/pipeline.h,
csrc/cuda/list_walk.h) on threads against modelled mbarriers, over random block lists, and
fails on a hang, a stage read before it was filled or refilled before it was released, or a
tile count that differs from the list's. No GPU or CUDA toolkit needed: a C++17 compiler."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess

import pytest

from conftest import skip_or_fail

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> pathlib.Path:
    compiler = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if compiler is None:
        skip_or_fail("no C++ compiler")
    exe = tmp_path_factory.mktemp("hopper_pipeline") / "model"
    subprocess.run([compiler, "-std=c++17", "-O1", "-pthread", "-Wall", "-Werror",
                    f"-I{ROOT / 'csrc'}", str(ROOT / "tests" / "hopper_pipeline_model.cpp"),
                    "-o", str(exe)], check=True, capture_output=True, text=True)
    return exe


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_pipeline_model_on_random_lists(model, seed):
    result = subprocess.run([str(model), "60", str(seed)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("ok")


def test_the_support_table_describes_the_opt_in_hopper_kernels(monkeypatch):
    import torch

    from sparse_attention import kernel_table, support

    monkeypatch.delenv(kernel_table.CUDA_HOPPER_ENV, raising=False)
    assert not kernel_table.CUDA_HOPPER_DEFAULT
    assert kernel_table.CUDA_HOPPER_PASSES == ("forward", "backward")
    assert support.hopper_kernels(torch.bfloat16, 128, 128, capability=(9, 0)) == \
        "opt-in: set SPARSE_ATTENTION_HOPPER_KERNELS=1 or pass cuda_kernels='hopper'"
    assert support.hopper_kernels(torch.float16, 64, 64, capability=(9, 0)).startswith("not for head_dim")
    assert support.hopper_kernels(torch.float16, 64, 128, capability=(8, 0)).startswith("not for compute")
    monkeypatch.setenv(kernel_table.CUDA_HOPPER_ENV, "1")
    assert support.hopper_kernels(torch.float16, 64, 128, capability=(9, 0)) == "on"
