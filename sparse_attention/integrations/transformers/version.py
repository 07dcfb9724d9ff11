"""The transformers versions this integration is tested with, and a clear error for others."""

from __future__ import annotations

from sparse_attention.integrations import TRANSFORMERS_MINIMUM_VERSION as MINIMUM_VERSION


def check_version() -> None:
    """Raises ImportError when transformers is missing or older than MINIMUM_VERSION."""
    try:
        import transformers
    except ImportError as error:
        raise ImportError(
            "sparse_attention.integrations.transformers needs transformers: "
            "pip install 'sparse_attention[transformers]'"
        ) from error
    from packaging.version import Version  # a dependency of transformers

    if Version(transformers.__version__) < Version(MINIMUM_VERSION):
        raise ImportError(
            f"sparse_attention.integrations.transformers needs transformers>={MINIMUM_VERSION}, "
            f"found {transformers.__version__}: pip install -U 'sparse_attention[transformers]'"
        )
