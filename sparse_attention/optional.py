"""Optional dependencies: imported where they are used, with an error that says how to get them.

The op, the patterns and the modules need torch only; saving models and the training command
need the packages of the `train` extra, which `import sparse_attention` never imports.
"""

from __future__ import annotations

import importlib

_PACKAGES = {"yaml": "pyyaml"}  # import name -> distribution name, where they differ


def require(module: str, extra: str = "train", purpose: str = ""):
    """The module, imported; ImportError naming the package and the extra when it is missing."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        package = _PACKAGES.get(module.split(".")[0], module.split(".")[0])
        needed = f" for {purpose}" if purpose else ""
        raise ImportError(f"{package} is needed{needed}: pip install 'sparse_attention[{extra}]' "
                          f"(or pip install {package})") from error
