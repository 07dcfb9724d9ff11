"""sparse_attention.models: training steps, the paper's initialisation, both attention paths
giving the same model, gradient checkpointing, torch.compile, autocast, generation, padding in
the classifier, save/load, and the errors."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import sparse_attention as sa
from sparse_attention.models import (
    KVCache, SparseClassifierConfig, SparseTransformerClassifier, SparseTransformerConfig, SparseTransformerLM,
)

N = 200  # not a multiple of the block size


def lm_config(**changes) -> SparseTransformerConfig:
    values = dict(vocab_size=50, max_seq_len=256, d_model=64, num_layers=3, num_heads=4,
                  block_size=32, pattern="fixed", sdpa_max_len=0)
    return SparseTransformerConfig(**{**values, **changes})


def classifier_config(**changes) -> SparseClassifierConfig:
    values = dict(vocab_size=50, max_seq_len=256, d_model=64, num_layers=2, num_heads=4,
                  block_size=32, pattern="local", num_classes=3, sdpa_max_len=0)
    return SparseClassifierConfig(**{**values, **changes})


def tokens(batch=2, n=N, seed=0, vocab=50):
    return torch.randint(0, vocab, (batch, n), generator=torch.Generator().manual_seed(seed))


def paths(model) -> list[str]:
    return [block.attn.dispatch.last_path for block in model.transformer.blocks]


@pytest.mark.parametrize("changes", [
    dict(pattern="strided_alternating", positions="rotary"),
    dict(pattern=["fixed", "bigbird", "local"], pattern_params=[{}, {"num_random_blocks": 1}, {"window": 64}],
         tie_embeddings=False),
])
def test_lm_training_step(changes):
    torch.manual_seed(0)
    model = SparseTransformerLM(lm_config(**changes))
    x = tokens()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss = model(x, labels=x).loss
    loss.backward()
    assert paths(model) == ["sparse"] * 3
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    optimizer.step()
    assert model(x, labels=x).loss < loss


def test_classifier_training_step():
    torch.manual_seed(0)
    model = SparseTransformerClassifier(classifier_config(pattern="bigbird"))
    x, labels = tokens(), torch.tensor([0, 2])
    mask = torch.ones(2, N, dtype=torch.long)
    mask[1, 130:] = 0
    loss = model(x, attention_mask=mask, labels=labels).loss
    loss.backward()
    assert paths(model) == ["sparse"] * 2
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_labels_and_targets_give_the_same_loss():
    model = SparseTransformerLM(lm_config())
    x = tokens()
    targets = torch.cat((x[:, 1:], torch.full((2, 1), -100)), dim=1)
    torch.testing.assert_close(model(x, labels=x).loss, model(x, targets=targets).loss)
    expected = torch.nn.functional.cross_entropy(model(x).logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
    torch.testing.assert_close(model(x, labels=x).loss, expected)


def test_residual_projections_scaled_at_init():
    torch.manual_seed(0)
    config = lm_config(num_layers=8, d_model=128)
    model = SparseTransformerLM(config)
    block = model.transformer.blocks[0]
    scaled = 0.02 / math.sqrt(2 * 8)
    for weight, std in ((block.attn.out.weight, scaled), (block.mlp_out.weight, scaled),
                        (block.attn.qkv.weight, 0.02), (block.mlp_in.weight, 0.02)):
        assert abs(weight.std().item() / std - 1) < 0.05


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_sparse_and_sdpa_paths_give_the_same_model(positions):
    """The dispatch's SDPA path (pattern's element mask) computes what the kernels compute."""
    torch.manual_seed(0)
    sparse = SparseTransformerLM(lm_config(positions=positions, pattern="strided_alternating"))
    sdpa = SparseTransformerLM(dataclasses.replace(sparse.config, sdpa_max_len=N))
    sdpa.load_state_dict(sparse.state_dict())
    x = tokens()
    a, b = sparse(x, labels=x), sdpa(x, labels=x)
    assert paths(sparse) == ["sparse"] * 3 and paths(sdpa) == ["sdpa"] * 3
    torch.testing.assert_close(a.logits, b.logits, atol=2e-5, rtol=0)
    a.loss.backward()
    b.loss.backward()
    for (name, p), q in zip(sparse.named_parameters(), sdpa.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=2e-5, rtol=1e-3, msg=name)


def test_gradient_checkpointing_gives_the_same_gradients():
    config = lm_config(dropout=0.1, attention_dropout=0.1)
    torch.manual_seed(0)
    plain = SparseTransformerLM(config)
    checkpointed = SparseTransformerLM(dataclasses.replace(config, gradient_checkpointing=True))
    checkpointed.load_state_dict(plain.state_dict())
    x = tokens()
    for model in (plain, checkpointed):
        torch.manual_seed(1)  # the same dropout masks; checkpointing replays them
        model(x, labels=x).loss.backward()
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_attention_dropout_in_training_on_the_sparse_path():
    torch.manual_seed(0)
    model = SparseTransformerLM(lm_config(attention_dropout=0.2))
    x = tokens()
    losses = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        losses.append(model(x, labels=x).loss)
    assert paths(model) == ["sparse"] * 3
    assert losses[0] == losses[1] and losses[0] != losses[2]
    with torch.no_grad():
        assert model.eval()(x, labels=x).loss != losses[0]
    losses[0].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_compile_fullgraph_whole_models_with_padding():
    torch.manual_seed(0)
    lm = SparseTransformerLM(lm_config(num_layers=2, pattern="bigbird")).eval()
    x = tokens()
    compiled = torch.compile(lm, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, labels=x).loss, lm(x, labels=x).loss, atol=1e-5, rtol=0)
    classifier = SparseTransformerClassifier(SparseClassifierConfig(
        vocab_size=lm.config.vocab_size, max_seq_len=lm.config.max_seq_len, d_model=32,
        num_layers=2, num_heads=4, num_classes=3, block_size=lm.config.block_size,
        pattern="longformer", sdpa_max_len=0)).eval()
    mask = torch.ones_like(x)
    mask[-1, x.shape[1] // 2:] = 0
    compiled = torch.compile(classifier, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, attention_mask=mask).logits,
                               classifier(x, attention_mask=mask).logits, atol=1e-5, rtol=0)


def test_compile_fullgraph_sparse_and_sdpa_blocks():
    torch.manual_seed(0)
    model = SparseTransformerLM(lm_config(num_layers=2, pattern=["dense", "local"]))
    x = tokens()
    # aot_eager: Dynamo (fullgraph: no graph break) and AOTAutograd trace forward and backward
    # as inductor would, without its minutes of code generation on a small CI machine.
    compiled = torch.compile(model.transformer, fullgraph=True, backend="aot_eager")
    hidden = compiled(x)
    assert paths(model) == ["sdpa", "sparse"]
    expected = model.transformer(x)
    torch.testing.assert_close(hidden, expected, atol=1e-5, rtol=0)
    grad = torch.randn_like(hidden)
    ours = torch.autograd.grad(hidden, list(model.parameters()), grad, allow_unused=True)
    theirs = torch.autograd.grad(expected, list(model.parameters()), grad, allow_unused=True)
    for a, b in zip(ours, theirs):
        if b is not None:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_autocast_bfloat16():
    torch.manual_seed(0)
    model = SparseTransformerLM(lm_config(positions="rotary"))
    x = tokens()
    exact = model(x, labels=x).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, labels=x)
    assert out.logits.dtype == torch.bfloat16 and paths(model) == ["sparse"] * 3
    assert abs(out.loss.item() - exact.item()) < 0.02 * exact.item()
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_generate():
    torch.manual_seed(0)
    model = SparseTransformerLM(lm_config(max_seq_len=64, block_size=16))
    model.train()
    prompt = tokens(n=60)
    out = model.generate(prompt, 6, greedy=True)  # runs past max_seq_len: the context is cropped
    long_prompt = torch.cat((prompt, prompt), dim=1)  # longer than max_seq_len: its tail is read
    assert torch.equal(model.generate(long_prompt, 2, greedy=True)[:, -2:],
                       model.generate(long_prompt[:, -64:], 2, greedy=True)[:, -2:])
    assert out.shape == (2, 66) and torch.equal(out[:, :60], prompt) and model.training
    model.eval()
    for t in range(60, 66):
        assert torch.equal(out[:, t], model(out[:, max(0, t - 64):t]).logits[:, -1].argmax(-1))
    sampled = [model.generate(prompt, 4, top_k=5, generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(sampled[0], sampled[1])
    assert torch.equal(model.generate(prompt, 4, top_k=1), out[:, :64])
    assert torch.equal(model.generate(prompt, 4, top_p=1e-6), out[:, :64])  # the nucleus is the top token
    with pytest.raises(ValueError, match="top_p: expected a probability"):
        model.generate(prompt, 1, top_p=1.5)


def test_nucleus_keeps_the_smallest_set_reaching_top_p():
    from sparse_attention.models.lm import _nucleus
    probabilities = torch.tensor([[0.1, 0.5, 0.05, 0.3, 0.05]])
    kept = _nucleus(probabilities.log(), 0.75).isfinite()
    assert kept.tolist() == [[False, True, False, True, False]]  # 0.5 + 0.3 reach 0.75
    assert _nucleus(probabilities.log(), 0.79).isfinite().sum() == 2
    assert _nucleus(probabilities.log(), 0.81).isfinite().sum() == 3


@pytest.mark.parametrize("path", ["sparse", "sdpa"])
@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_kv_cache_gives_the_logits_of_the_whole_sequence(positions, path):
    """A prefill, chunks (one starting inside a block) and single tokens through a KVCache
    give each token the logits that the whole sequence gives it."""
    torch.manual_seed(0)
    config = lm_config(max_seq_len=128, block_size=16, positions=positions,
                       pattern=["local", "strided_alternating", "bigbird"],
                       pattern_params=[{}, {"stride": 32}, {"num_random_blocks": 1}],
                       sdpa_max_len=0 if path == "sparse" else 128)
    model = SparseTransformerLM(config).eval()
    x = tokens(n=100)
    cache = KVCache()
    pieces = [model(x[:, :37], cache=cache).logits, model(x[:, 37:45], cache=cache).logits,
              model(x[:, 45:64], cache=cache).logits]
    pieces += [model(x[:, t:t + 1], cache=cache).logits for t in range(64, 100)]
    assert cache.length() == 100
    assert [block.attn.dispatch.last_path for block in model.transformer.blocks] == [path] * 3
    torch.testing.assert_close(torch.cat(pieces, dim=1), model(x).logits, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="input_ids: 29 tokens after 100 cached exceed max_seq_len=128"):
        model(tokens(n=29), cache=cache)


def test_generate_with_and_without_cache():
    torch.manual_seed(0)
    model = SparseTransformerLM(lm_config(max_seq_len=64, block_size=16, positions="rotary",
                                          pattern="strided_alternating"))
    prompt = tokens(n=50)
    cached = model.generate(prompt, 20, greedy=True)  # past max_seq_len: the cache gives way
    assert torch.equal(cached, model.generate(prompt, 20, greedy=True, use_cache=False))


@pytest.mark.parametrize("pooling", ["mean", "first"])
def test_classifier_ignores_padding(pooling):
    """Padding a sequence with junk tokens leaves its logits unchanged."""
    torch.manual_seed(0)
    model = SparseTransformerClassifier(classifier_config(pooling=pooling))
    short = tokens(batch=1, n=150)
    padded = torch.cat((short, tokens(batch=1, n=N - 150, seed=5)), dim=1)
    pad = torch.zeros(1, N, dtype=torch.bool)
    pad[:, 150:] = True
    expected = model(short).logits
    torch.testing.assert_close(model(padded, key_padding_mask=pad).logits, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(model(padded, attention_mask=(~pad).long()).logits, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(model(padded).logits, expected, atol=1e-3)


def test_save_and_load(tmp_path):
    torch.manual_seed(0)
    lm = SparseTransformerLM(lm_config(pattern=["fixed", "strided_alternating", "local"],
                                       pattern_params=[{"num_patterns": 2}, {"stride": 64}, {}]))
    lm.save_pretrained(tmp_path / "lm")
    loaded = SparseTransformerLM.from_pretrained(tmp_path / "lm")
    assert loaded.config == lm.config and loaded.head.weight is loaded.transformer.embed.weight
    x = tokens()
    assert torch.equal(loaded(x).logits, lm(x).logits)
    classifier = SparseTransformerClassifier(classifier_config())
    classifier.save_pretrained(tmp_path / "classifier")
    loaded = SparseTransformerClassifier.from_pretrained(tmp_path / "classifier")
    assert loaded.config == classifier.config and torch.equal(loaded(x).logits, classifier(x).logits)
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        SparseTransformerLM.from_pretrained(tmp_path / "missing")


def test_layer_patterns():
    config = lm_config(num_layers=4, pattern="strided_alternating", pattern_params={"stride": 64})
    patterns = config.layer_patterns()
    assert [type(p).__name__ for p in patterns] == ["Local", "Dilated", "Local", "Dilated"]
    assert patterns[0].window == 64 and patterns[1].dilation == 64
    fixed = lm_config(pattern="fixed").layer_patterns()
    assert fixed[0] is fixed[2] and fixed[0].chunk == sa.stride_for(256, 32)


def test_errors():
    with pytest.raises(ValueError, match="d_model: expected a multiple of num_heads"):
        lm_config(d_model=66)
    with pytest.raises(ValueError, match="pattern: expected one of"):
        lm_config(pattern="sparse")
    with pytest.raises(ValueError, match=r"pattern: expected one name per layer \(3\), got 2"):
        lm_config(pattern=["fixed", "local"])
    with pytest.raises(ValueError, match=r"num_heads: expected a multiple of num_patterns \(3\), got 4"):
        lm_config(pattern="fixed", pattern_params={"num_patterns": 3, "chunk": 128})
    with pytest.raises(ValueError, match="num_heads: .* even number of heads"):
        lm_config(num_heads=1, pattern="strided", pattern_params={"factorized": True})
    with pytest.raises(ValueError, match="positions: expected one of learned, rotary"):
        lm_config(positions="sinusoidal")
    with pytest.raises(ValueError, match="attention_dropout: expected a probability"):
        lm_config(attention_dropout=1.0)
    with pytest.raises(ValueError, match="tie_embeddings"):
        classifier_config(tie_embeddings=True)
    with pytest.raises(ValueError, match="config: unknown fields"):
        SparseTransformerConfig.from_dict({"layers": 3})
    with pytest.raises(TypeError, match="config: expected a SparseTransformerConfig, got dict"):
        SparseTransformerLM({"d_model": 64})
    model = SparseTransformerLM(lm_config())
    with pytest.raises(ValueError, match="input_ids: 300 tokens exceed max_seq_len=256"):
        model(tokens(n=300))
    with pytest.raises(TypeError, match="input_ids: expected an int64"):
        model(torch.randn(2, 10))
    with pytest.raises(ValueError, match=r"labels: expected shape \(2, 200\)"):
        model(tokens(), labels=tokens()[:, :-1])
    with pytest.raises(ValueError, match="labels, targets: pass one"):
        model(tokens(), labels=tokens(), targets=tokens())
    classifier = SparseTransformerClassifier(classifier_config())
    with pytest.raises(ValueError, match=r"labels: expected a class index tensor of shape \(2,\)"):
        classifier(tokens(), labels=torch.tensor([1]))
    with pytest.raises(ValueError, match="attention_mask: .* 1 \\(keep\\) or 0 \\(ignore\\)"):
        classifier(tokens(), attention_mask=torch.full((2, N), 2))
