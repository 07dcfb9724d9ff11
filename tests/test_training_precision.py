"""--precision auto: bf16 where the device computes it natively, else fp32 (CPU) or fp16 (GPU),
and the run says which precision ran and why."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
import torch

from sparse_attention.training import TrainConfig, demo_command, runtime
from sparse_attention.training.metrics_log import read_metrics

from test_training import TINY, write_corpus

CPU = torch.device("cpu")
AVX2_ENV = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
PROBE = ("import torch; from sparse_attention.training import runtime; "
         "print(runtime.choose_precision('auto', torch.device('cpu')))")


def native_cpu(monkeypatch, **capabilities):
    """Makes torch report a CPU with native bf16 (and whatever capabilities say), oneDNN and
    ATen at full width, and no ISA caps in the environment."""
    monkeypatch.setattr(runtime, "_cpu_capabilities",
                        lambda: {"architecture": "x86_64", "avx2": True, "avx512_bf16": True, **capabilities})
    monkeypatch.setattr(runtime, "_mkldnn_bf16", lambda: True)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: True)
    for variable in (*runtime.ONEDNN_ISA_VARIABLES, "ATEN_CPU_CAPABILITY"):
        monkeypatch.delenv(variable, raising=False)


def test_auto_is_the_default_of_train_and_demo():
    assert TrainConfig().precision == "auto"
    assert demo_command.DEMO_SETTINGS["precision"] == "auto"


def test_auto_picks_bf16_where_the_cpu_computes_it_natively(monkeypatch):
    native_cpu(monkeypatch)
    choice = runtime.choose_precision("auto", CPU)
    assert choice.name == "bf16" and str(choice) == "bf16 (auto: this CPU computes bf16 natively, with AVX512_BF16)"


def test_auto_picks_fp32_without_native_bf16(monkeypatch):
    native_cpu(monkeypatch, avx512_bf16=False, amx_bf16=False)
    # oneDNN would still run bf16 here (emulated on AVX512_CORE): the CPU's own flags decide.
    assert str(runtime.choose_precision("auto", CPU)) == \
        "fp32 (auto: this CPU has no native bf16, neither AVX512_BF16 nor AMX-BF16)"
    # An explicit choice is kept, with a warning in its reason.
    bf16 = runtime.choose_precision("bf16", CPU)
    assert bf16.name == "bf16" and "emulated" in bf16.reason and "--precision auto" in bf16.reason
    assert str(runtime.choose_precision("fp32", CPU)) == "fp32 (as asked)"
    with pytest.raises(ValueError, match="precision: fp16 needs a GPU"):
        runtime.choose_precision("fp16", CPU)


@pytest.mark.parametrize("variable, value, named", [
    ("ONEDNN_MAX_CPU_ISA", "AVX2", "ONEDNN_MAX_CPU_ISA=AVX2"),
    ("ONEDNN_MAX_CPU_ISA", "avx512_core", "ONEDNN_MAX_CPU_ISA=AVX512_CORE"),
    ("DNNL_MAX_CPU_ISA", "AVX2", "DNNL_MAX_CPU_ISA=AVX2"),
])
def test_a_onednn_isa_cap_makes_auto_pick_fp32(monkeypatch, variable, value, named):
    native_cpu(monkeypatch)  # even where torch's own probes still say bf16
    monkeypatch.setenv(variable, value)
    choice = runtime.choose_precision("auto", CPU)
    assert choice.name == "fp32" and named in choice.reason


def test_an_aten_capability_cap_makes_auto_pick_fp32(monkeypatch):
    native_cpu(monkeypatch)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    choice = runtime.choose_precision("auto", CPU)
    assert choice.name == "fp32" and "ATEN_CPU_CAPABILITY=avx2" in choice.reason


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 instruction set variables")
@pytest.mark.parametrize("env", [AVX2_ENV, {"ONEDNN_MAX_CPU_ISA": "AVX2"}, {"ATEN_CPU_CAPABILITY": "avx2"}])
def test_the_avx2_environment_picks_fp32_in_a_fresh_process(env):
    """With the real probes of torch: the variables are read when torch starts."""
    result = subprocess.run([sys.executable, "-c", PROBE], env={**os.environ, **env},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("fp32 (auto: "), result.stdout


def test_auto_on_cuda_picks_bf16_else_fp16(monkeypatch):
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert str(runtime.choose_precision("auto", gpu)) == "bf16 (auto: the GPU computes bf16)"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    assert runtime.choose_precision("auto", gpu).name == "fp16"
    assert str(runtime.choose_precision("fp16", gpu)) == "fp16 (as asked)"


def test_the_console_and_the_report_say_which_precision_ran_and_why(tmp_path, monkeypatch, capsys):
    corpus = write_corpus(tmp_path / "corpus", documents=6, words=200)
    monkeypatch.setattr(runtime, "cpu_bf16", lambda: (False, "this CPU has no native bf16"))
    auto = [*TINY]
    auto[auto.index("--precision") + 1] = "auto"
    from sparse_attention import cli

    result = cli.run(["train", *auto, "--data", str(corpus), "--out", str(tmp_path / "run"), "--steps", "2"])
    captured = capsys.readouterr()
    line = "precision fp32 (auto: this CPU has no native bf16)"
    assert line in captured.err and line in captured.out
    assert result.runs[0].settings["precision"] == "fp32 (auto: this CPU has no native bf16)"
    report = (tmp_path / "run" / "report" / "report.md").read_text()
    assert "| precision | fp32 (auto: this CPU has no native bf16) |" in report
    # The saved settings keep the setting itself, so a resume on another machine decides anew.
    assert "precision: auto" in (tmp_path / "run" / "config.yaml").read_text()
    assert len([r for r in read_metrics(tmp_path / "run") if r["kind"] == "train"]) == 2
