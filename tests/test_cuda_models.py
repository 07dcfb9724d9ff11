"""The modules, models and transformers integration on a GPU: the CUDA kernels under the layers
that use them, in fp16 and bf16 (autocast), held to FlashAttention's rule against an fp64 CPU
copy of the same model: the error of the sparse-kernel path may be at most twice that of the
same model on the GPU through SDPA (with the pattern's element mask), plus a small floor.
Skipped without a GPU; with a GPU but a build without CUDA kernels, skipped outside CI and
failed under CI=true (conftest.require_cuda)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import sparse_attention as sa
from sparse_attention.integrations import TRANSFORMERS_MINIMUM_VERSION
from sparse_attention.models import (
    SparseClassifierConfig, SparseTransformerClassifier, SparseTransformerConfig, SparseTransformerLM,
)
from sparse_attention.nn import SparseMultiheadAttention
from conftest import require_module, requires_cuda

# Skipped without a GPU; a GPU with a build that lacks CUDA kernels fails under CI=true.
pytestmark = requires_cuda

HALF_DTYPES = [torch.float16, torch.bfloat16]
N = 300  # not a multiple of the block size
# head_dim 64 and block 64: shapes the CUDA kernels take.
SHAPE = dict(vocab_size=64, max_seq_len=512, d_model=128, num_layers=2, num_heads=2, block_size=64)
FLOOR = 1e-3


def relative_error(value: torch.Tensor, exact: torch.Tensor) -> float:
    value, exact = value.detach().cpu().double(), exact.detach().cpu().double()
    return ((value - exact).norm() / exact.norm()).item()


def gradients(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten().double().cpu() for p in model.parameters()])


def run_three_ways(model_class, config, inputs: dict, dtype: torch.dtype):
    """(exact, sparse, sdpa): an fp64 CPU run, then GPU runs of the same weights under
    autocast on the sparse kernels (sdpa_max_len=0) and on SDPA with the pattern's element
    mask (every length below sdpa_max_len). Each: (output, all gradients, paths taken)."""
    torch.manual_seed(0)
    weights = model_class(config).state_dict()
    runs = []
    for device, sdpa_max_len in (("cpu", 0), ("cuda", 0), ("cuda", 10**6)):
        model = model_class(dataclasses.replace(config, sdpa_max_len=sdpa_max_len))
        model.load_state_dict(weights)
        model = model.to(device, torch.float64 if device == "cpu" else torch.float32)
        args = {name: t.to(device) for name, t in inputs.items()}
        with torch.autocast("cuda", dtype=dtype, enabled=device == "cuda"):
            out = model(**args)
        out.loss.backward()
        paths = {block.attn.dispatch.last_path for block in model.transformer.blocks}
        runs.append((out, gradients(model), paths))
    return runs


def assert_rule(name: str, sparse: torch.Tensor, sdpa: torch.Tensor, exact: torch.Tensor):
    ours, theirs = relative_error(sparse, exact), relative_error(sdpa, exact)
    assert ours <= 2 * theirs + FLOOR, f"{name}: sparse kernels {ours:.2e}, SDPA {theirs:.2e}"


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("pattern", ["fixed", "bigbird"])
def test_language_model_under_autocast(pattern, dtype):
    x = torch.randint(0, SHAPE["vocab_size"], (2, N), generator=torch.Generator().manual_seed(1))
    config = SparseTransformerConfig(**SHAPE, pattern=pattern, positions="rotary")
    (exact, exact_grads, _), (sparse, sparse_grads, sparse_paths), (sdpa, sdpa_grads, sdpa_paths) = (
        run_three_ways(SparseTransformerLM, config, {"input_ids": x, "labels": x}, dtype))
    assert sparse_paths == {"sparse"} and sdpa_paths == {"sdpa"}
    assert_rule("logits", sparse.logits, sdpa.logits, exact.logits)
    assert_rule("gradients", sparse_grads, sdpa_grads, exact_grads)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_classifier_with_padding_under_autocast(dtype):
    x = torch.randint(0, SHAPE["vocab_size"], (2, N), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, N, dtype=torch.long)
    mask[1, 170:] = 0
    config = SparseClassifierConfig(**SHAPE, pattern="local", num_classes=3)
    inputs = {"input_ids": x, "attention_mask": mask, "labels": torch.tensor([0, 2])}
    (exact, exact_grads, _), (sparse, sparse_grads, _), (sdpa, sdpa_grads, _) = run_three_ways(
        SparseTransformerClassifier, config, inputs, dtype)
    assert_rule("logits", sparse.logits, sdpa.logits, exact.logits)
    assert_rule("gradients", sparse_grads, sdpa_grads, exact_grads)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_multihead_attention_module(dtype):
    torch.manual_seed(3)
    modules = [SparseMultiheadAttention(128, 2, batch_first=True, pattern=sa.Fixed(chunk=128, block_size=64),
                                        sdpa_max_len=sdpa_max_len) for sdpa_max_len in (0, 0, 10**6)]
    for module in modules[1:]:
        module.load_state_dict(modules[0].state_dict())
    exact_module, sparse_module, sdpa_module = modules[0].double(), modules[1].cuda(), modules[2].cuda()
    x = torch.randn(2, N, 128, dtype=torch.float64)
    exact, _ = exact_module(x, x, x, is_causal=True)
    with torch.autocast("cuda", dtype=dtype):
        xc = x.float().cuda()
        out, _ = sparse_module(xc, xc, xc, is_causal=True)
        dense, _ = sdpa_module(xc, xc, xc, is_causal=True)
    assert (sparse_module.attention_path, sdpa_module.attention_path) == ("sparse", "sdpa")
    assert_rule("out", out, dense, exact)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_transformers_llama(dtype):
    transformers = require_module("transformers", minversion=TRANSFORMERS_MINIMUM_VERSION)
    from sparse_attention.integrations.transformers import register

    register("sparse_attention_cuda_test", pattern=sa.Local(128, block_size=64))
    config = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=512, vocab_size=97)
    torch.manual_seed(4)
    exact_model = transformers.AutoModelForCausalLM.from_config(
        config, attn_implementation="sparse_attention_cuda_test").double()
    x = torch.randint(0, 97, (2, N), generator=torch.Generator().manual_seed(5))
    exact = exact_model(x).logits
    logits = {}
    for implementation in ("sparse_attention_cuda_test", "sdpa"):
        model = copy.deepcopy(exact_model).float().cuda()
        model.set_attn_implementation(implementation)
        with torch.autocast("cuda", dtype=dtype):
            logits[implementation] = model(x.cuda()).logits
    # SDPA here is dense causal attention, a superset of the local pattern: compare our GPU
    # run with the exact local model, and SDPA's precision on the dense one.
    exact_dense_model = copy.deepcopy(exact_model)
    exact_dense_model.set_attn_implementation("sdpa")
    exact_dense = exact_dense_model(x).logits
    ours, theirs = relative_error(logits["sparse_attention_cuda_test"], exact), relative_error(logits["sdpa"], exact_dense)
    assert ours <= 2 * theirs + FLOOR, f"sparse kernels {ours:.2e}, SDPA {theirs:.2e}"


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_training_command_on_the_gpu(tmp_path, precision):
    """`sparse-attention train --device cuda`: fp16 runs with a GradScaler, bf16 without; the
    loss falls and a resume continues bit for bit."""
    from sparse_attention import cli
    from sparse_attention.training.metrics_log import read_metrics

    data = tmp_path / "text.txt"
    data.write_text(" ".join(["the quick brown fox jumps over the lazy dog"] * 400))
    common = ["--data", str(data), "--seq-len", "256", "--d-model", "128", "--num-layers", "2",
              "--num-heads", "2", "--batch-size", "4", "--sdpa-max-len", "0", "--device", "cuda",
              "--precision", precision, "--no-progress", "--no-tensorboard", "--lr", "3e-3",
              "--warmup-steps", "2", "--lr-decay-steps", "20"]
    cli.run(["train", *common, "--steps", "20", "--out", str(tmp_path / "straight")])
    losses = [r["loss"] for r in read_metrics(tmp_path / "straight") if r["kind"] == "train"]
    assert sum(losses[-3:]) < 0.7 * sum(losses[:3])
    cli.run(["train", *common, "--steps", "10", "--out", str(tmp_path / "halves")])
    cli.run(["train", "--resume", "--steps", "20", "--out", str(tmp_path / "halves")])
    from safetensors.torch import load_file

    a, b = (load_file(str(tmp_path / run / "checkpoints" / "step-00000020" / "model.safetensors"))
            for run in ("straight", "halves"))
    # The backward's atomics (fp32 dQ accumulation) may reorder sums: allow rounding.
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-3, rtol=1e-3)
