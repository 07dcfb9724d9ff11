"""The transformers versions this integration is tested with, and a clear error for others."""

from __future__ import annotations

# The mask interface's arguments (q_offset, kv_offset, local_size) and the cache layers' mask
# sizes are those of this release onwards.
MINIMUM_VERSION = "5.24"


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
