"""Predicted memory needs, checked before an allocation that cannot succeed is attempted."""

from __future__ import annotations

import os


def physical_memory() -> int | None:
    """Bytes of physical memory of this machine, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def check_fits_in_memory(what: str, nbytes: int) -> None:
    """Raises MemoryError when `what` needs more bytes than the machine has memory.

    Only for sizes known before allocating; smaller requests are left to the allocator."""
    total = physical_memory()
    if total is not None and nbytes > total:
        raise MemoryError(
            f"{what}: needs at least {nbytes / 2**30:.1f} GiB, more than the "
            f"{total / 2**30:.1f} GiB of memory of this machine"
        )
