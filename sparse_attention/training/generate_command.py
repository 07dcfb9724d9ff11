"""`sparse-attention generate`: continue a prompt with a trained language model.

  sparse-attention generate --checkpoint runs/notes --prompt "def main(" --max-new-tokens 200
"""

from __future__ import annotations

import argparse

import torch

from sparse_attention.training import runtime
from sparse_attention.training.config import DEVICES
from sparse_attention.training.trained_model import load_trained


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="DIR",
                        help="a run folder (its latest checkpoint) or one checkpoint folder")
    parser.add_argument("--prompt", required=True, help="the text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=200, help="(default: 200)")
    parser.add_argument("--temperature", type=float, default=0.8, help="(default: 0.8)")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    parser.add_argument("--top-p", type=float, default=0.95,
                        help="sample among the most likely tokens that make up this probability (default: 0.95)")
    parser.add_argument("--greedy", action="store_true", help="always take the most likely token")
    parser.add_argument("--seed", type=int, default=0, help="(default: 0)")
    parser.add_argument("--device", choices=DEVICES, default="auto", help="(default: auto)")


def run(args: argparse.Namespace) -> str:
    device = runtime.pick_device(args.device)
    trained = load_trained(args.checkpoint, device)
    if trained.config.task != "lm":
        raise ValueError(f"--checkpoint: {trained.folder} holds a classifier; generate needs a language model")
    prompt = trained.tokenizer.encode(args.prompt)
    if not prompt:
        raise ValueError("--prompt: expected some text, got an empty prompt")
    input_ids = torch.tensor([prompt], device=device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    output = trained.model.generate(input_ids, args.max_new_tokens, temperature=args.temperature,
                                    top_k=args.top_k, top_p=args.top_p, greedy=args.greedy,
                                    generator=generator)
    text = trained.tokenizer.decode(output[0, len(prompt):].tolist())
    print(args.prompt + text)
    return text
