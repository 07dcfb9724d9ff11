"""save_pretrained / from_pretrained on a local folder: config.json and model.safetensors."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from sparse_attention.optional import require

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


class PretrainedMixin:
    """For models built as Model(config) with a `config` dataclass of class `config_class`."""

    config_class: type

    @classmethod
    def check_config(cls, config):
        """config, if it is a config_class."""
        if not isinstance(config, cls.config_class):
            raise TypeError(f"config: expected a {cls.config_class.__name__}, got {type(config).__name__}")
        return config

    def save_pretrained(self, folder: str | Path) -> None:
        """Writes folder/config.json and folder/model.safetensors (tied weights stored once)."""
        safetensors = require("safetensors.torch", purpose="save_pretrained")  # before any write
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.config.save(folder / CONFIG_FILE)
        safetensors.save_model(self, str(folder / WEIGHTS_FILE))
        # safetensors writes through a private temporary file (0600): give the weights the
        # permissions every other file gets, as the umask says.
        os.chmod(folder / WEIGHTS_FILE, 0o666 & ~_umask())

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: torch.device | str = "cpu"):
        """The model saved in folder by save_pretrained, on device."""
        folder = Path(folder)
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"folder: {folder} has no {name} (written by save_pretrained)")
        model = cls(cls.config_class.load(folder / CONFIG_FILE))
        require("safetensors.torch", purpose="from_pretrained").load_model(
            model, str(folder / WEIGHTS_FILE), strict=True, device=str(device))
        return model.to(device)


def _umask() -> int:
    """The process's umask (read from /proc where it is, so that it is never changed)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
