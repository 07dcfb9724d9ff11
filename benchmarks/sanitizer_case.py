"""A small forward and backward on the GPU for compute-sanitizer (memcheck, racecheck):
tails in both lengths, Nq != Nk, GQA, per-head layouts, key padding, causal, both block
sizes and both dQ modes, so every kernel and every masked path runs once."""

from __future__ import annotations

import torch

import sparse_attention as sa


def main() -> None:
    g = torch.Generator().manual_seed(0)
    for block_size, head_dim in ((64, 64), (128, 32), (64, 128)):
        q = torch.randn(2, 4, 150, head_dim, generator=g).cuda().half().requires_grad_()
        k = torch.randn(2, 2, 200, head_dim, generator=g).cuda().half().requires_grad_()
        v = torch.randn(2, 2, 200, head_dim, generator=g).cuda().half().requires_grad_()
        qb, kb = -(-150 // block_size), -(-200 // block_size)
        layout = sa.BlockLayout(torch.rand(4, qb, kb, generator=g) < 0.7, block_size)
        pad = (torch.rand(2, 200, generator=g) < 0.2).cuda()
        pad[1, :100] = True
        for deterministic in (False, True):
            out = sa.sparse_attention(q, k, v, layout, causal=True, key_padding_mask=pad,
                                      deterministic=deterministic)
            torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    torch.cuda.synchronize()
    print("sanitizer case done")


if __name__ == "__main__":
    main()
