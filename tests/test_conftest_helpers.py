"""The rules of conftest.py for tests that cannot run: outside CI they skip with a reason,
under CI=true they fail (a missing test dependency, a GPU visible to a build without CUDA
kernels); no GPU at all skips everywhere (CI has none)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import sparse_attention as sa
import conftest
from conftest import cuda_missing, in_ci, require_cuda, require_module, skip_or_fail

MISSING = "sparse_attention_no_such_module"


@pytest.fixture
def ci(monkeypatch):
    monkeypatch.setenv("CI", "true")


@pytest.fixture
def not_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)


@pytest.mark.parametrize("value, expected", [("true", True), ("1", True), ("True", True),
                                             ("false", False), ("0", False), ("", False)])
def test_in_ci_reads_the_ci_variable(monkeypatch, value, expected):
    monkeypatch.setenv("CI", value)
    assert in_ci() is expected


def test_in_ci_without_the_variable(not_ci):
    assert not in_ci()


def test_skip_or_fail(ci, monkeypatch):
    with pytest.raises(pytest.fail.Exception, match="no flex"):
        skip_or_fail("no flex")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="no flex"):
        skip_or_fail("no flex")


def test_require_module_returns_the_module(ci):
    assert require_module("math").sqrt(4) == 2
    assert require_module("torch", minversion="2.0") is torch


def test_require_module_skips_outside_ci(not_ci):
    with pytest.raises(pytest.skip.Exception, match=MISSING):
        require_module(MISSING)
    with pytest.raises(pytest.skip.Exception, match="required is: .999"):
        require_module("torch", minversion="999")


def test_require_module_fails_under_ci(ci):
    with pytest.raises(pytest.fail.Exception, match=f"{MISSING}.*CI=true"):
        require_module(MISSING)
    with pytest.raises(pytest.fail.Exception, match="required is: .999.*CI=true"):
        require_module("torch", minversion="999")


def fake_machine(monkeypatch, gpu: bool, cuda_build: bool):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    monkeypatch.setattr(sa, "built_with_cuda", lambda: cuda_build)


@pytest.mark.parametrize("ci_value", ["true", ""])
def test_no_gpu_skips_even_under_ci(monkeypatch, ci_value):
    monkeypatch.setenv("CI", ci_value)
    fake_machine(monkeypatch, gpu=False, cuda_build=False)
    with pytest.raises(pytest.skip.Exception, match="needs a GPU"):
        require_cuda()


def test_gpu_without_cuda_build_skips_outside_ci(not_ci, monkeypatch):
    fake_machine(monkeypatch, gpu=True, cuda_build=False)
    with pytest.raises(pytest.skip.Exception, match="no CUDA kernels"):
        require_cuda()


def test_gpu_without_cuda_build_fails_under_ci(ci, monkeypatch):
    fake_machine(monkeypatch, gpu=True, cuda_build=False)
    with pytest.raises(pytest.fail.Exception, match="no CUDA kernels.*CI=true"):
        require_cuda()


def test_gpu_with_cuda_build_runs(ci, monkeypatch):
    fake_machine(monkeypatch, gpu=True, cuda_build=True)
    assert cuda_missing() is None
    require_cuda()


def test_a_file_whose_module_is_missing_is_an_error_under_ci(tmp_path):
    """The whole chain in a pytest run: a test file that needs a missing module and a test
    marked requires_cuda. Under CI the file is a collection error, and the marked test,
    with no GPU, skips."""
    shutil.copy(conftest.__file__, tmp_path / "conftest.py")
    (tmp_path / "test_needs_module.py").write_text(textwrap.dedent(f"""
        from conftest import require_module
        require_module("{MISSING}")

        def test_never_collected():
            pass
    """))
    (tmp_path / "test_marked.py").write_text(textwrap.dedent("""
        from conftest import requires_cuda
        import torch

        torch.cuda.is_available = lambda: False

        @requires_cuda
        def test_on_gpu():
            pass
    """))
    env = {name: value for name, value in os.environ.items() if name != "CI"}
    env["CI"] = "true"
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
                          "--continue-on-collection-errors",
                          str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    output = run.stdout + run.stderr
    assert run.returncode != 0, output
    assert "ERROR" in output and "test_needs_module.py" in output and MISSING in output, output
    assert "1 skipped" in output and "needs a GPU" in output, output
