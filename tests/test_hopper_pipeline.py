"""The Hopper kernels' pipeline bookkeeping on the CPU: tests/hopper_pipeline_model.cpp runs
the kernels' own produce/consume loops and list walks (csrc/cuda/hopper/pipeline.h,
csrc/cuda/list_walk.h), forward and backward, on threads against modelled mbarriers and a
copy engine that lands copies out of order, over random block lists, and fails on a hang, a
stage read before it was filled or refilled before it was released, or a tile count that
differs from the lists'. Deliberately broken pipelines must fail it. No GPU or CUDA toolkit
needed: a C++17 compiler."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess

import pytest

from conftest import skip_or_fail

ROOT = pathlib.Path(__file__).resolve().parent.parent


def build_model(directory: pathlib.Path, csrc: pathlib.Path = ROOT / "csrc") -> pathlib.Path:
    compiler = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if compiler is None:
        skip_or_fail("no C++ compiler")
    exe = directory / "model"
    subprocess.run([compiler, "-std=c++17", "-O1", "-pthread", "-Wall", "-Werror", f"-I{csrc}",
                    str(ROOT / "tests" / "hopper_pipeline_model.cpp"), "-o", str(exe)],
                   check=True, capture_output=True, text=True)
    return exe


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> pathlib.Path:
    return build_model(tmp_path_factory.mktemp("hopper_pipeline"))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_pipeline_model_on_random_lists(model, seed):
    result = subprocess.run([str(model), "60", str(seed)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("ok")


# Bugs the model must catch, as edits of pipeline.h, and what it must say: a consumer that does
# not wait for the previous step's V before multiplying by it (the forward), one that releases
# Q before the step's second half has read it (the backward), and warpgroup turns that never
# start or end unbalanced.
STALE = "a consumer read a stage another tile filled"
MUTATIONS = {
    "forward without the wait for V": (
        "    if (!first) sync.wait_full(kValues, previous.stage, previous.phase);\n", "", STALE),
    "backward releasing Q early": (
        "    first(cursor.stage, walk);\n    sync.wait_full(kValues, cursor.stage, cursor.phase);\n"
        "    second(cursor.stage, walk);\n    sync.release(kKeys, cursor.stage);\n",
        "    first(cursor.stage, walk);\n    sync.release(kKeys, cursor.stage);\n"
        "    sync.wait_full(kValues, cursor.stage, cursor.phase);\n    second(cursor.stage, walk);\n",
        STALE),
    "turns never opened": (
        "    if (first_step && warpgroup == 0) barriers.arrive(kFirst);\n", "", "pipeline hung"),
    "turns left open": (
        "    if (on && warpgroup == 0) barriers.sync(kFirst);\n", "",
        "the warpgroups' turns left a barrier unbalanced"),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_the_model_catches_a_broken_pipeline(tmp_path, mutation):
    csrc = tmp_path / "csrc"
    shutil.copytree(ROOT / "csrc", csrc, ignore=shutil.ignore_patterns("*.o", "*.so"))
    pipeline = csrc / "cuda" / "hopper" / "pipeline.h"
    old, new, message = MUTATIONS[mutation]
    text = pipeline.read_text()
    assert text.count(old) == 1, "the mutation no longer matches pipeline.h"
    pipeline.write_text(text.replace(old, new))
    result = subprocess.run([str(build_model(tmp_path, csrc)), "60", "1"], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode != 0 and message in result.stderr, result.stdout + result.stderr


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
