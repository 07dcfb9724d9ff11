"""What a checkpoint holds besides the weights, and putting it back.

A checkpoint folder holds model.safetensors + config.json (the model, loadable with
from_pretrained), train_config.yaml (the run's settings), tokenizer/ (and labels.json for a
classifier), and state.pt: step, optimizer, scheduler, gradient scaler, data sampler and the
random number generators of every process, so a resumed run continues bit for bit.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from sparse_attention.training.distributed import Processes

STATE_FILE = "state.pt"
TRAIN_CONFIG_FILE = "train_config.yaml"
TOKENIZER_FOLDER = "tokenizer"
LABELS_FILE = "labels.json"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_rng_states(processes: Processes) -> list[dict]:
    """Every process's generator states, in rank order (on every rank)."""
    mine = rng_state()
    if not processes.distributed:
        return [mine]
    every: list = [None] * processes.world_size
    dist.all_gather_object(every, mine)
    return every


def full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer,
                     processes: Processes) -> tuple[dict, dict]:
    """The whole model's and optimizer's state dicts (gathered from shards under FSDP; on
    every process the same under DDP)."""
    if not processes.distributed:
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict,
                          optimizer_state: dict, processes: Processes) -> None:
    if not processes.distributed:
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state,
                   options=StateDictOptions(full_state_dict=True))


def save_labels(folder: Path, label_names: list[str] | None) -> None:
    if label_names is not None:
        (folder / LABELS_FILE).write_text(json.dumps(label_names) + "\n")


def load_labels(folder: Path) -> list[str] | None:
    path = folder / LABELS_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def load_state(folder: Path) -> dict:
    """state.pt of a checkpoint folder (tensors, numbers and containers only)."""
    return torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
