"""Point-to-point exchange of tensors between the ranks of a group, asynchronous (isend and
irecv, so that computation runs while they travel), with every byte sent counted."""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist


@dataclasses.dataclass
class Traffic:
    """Bytes and messages this process has sent, by phase ("forward", "backward")."""

    sent_bytes: dict[str, int] = dataclasses.field(default_factory=dict)
    messages: dict[str, int] = dataclasses.field(default_factory=dict)

    def add(self, phase: str, tensor: torch.Tensor) -> None:
        self.sent_bytes[phase] = self.sent_bytes.get(phase, 0) + tensor.numel() * tensor.element_size()
        self.messages[phase] = self.messages.get(phase, 0) + 1

    def total_bytes(self) -> int:
        return sum(self.sent_bytes.values())

    def reset(self) -> None:
        self.sent_bytes.clear()
        self.messages.clear()


traffic = Traffic()


class Exchange:
    """Sends `outgoing` (group rank -> tensor) and receives tensors of `incoming` shapes
    (group rank -> shape), all posted at once; `wait(rank)` returns one received tensor."""

    def __init__(self, outgoing: dict[int, torch.Tensor], incoming: dict[int, tuple[int, ...]], *,
                 like: torch.Tensor, group, phase: str):
        def global_rank(rank: int) -> int:
            return rank if group is None else dist.get_global_rank(group, rank)

        self._received, self._receives = {}, {}
        for source, shape in incoming.items():
            buffer = torch.empty(shape, dtype=like.dtype, device=like.device)
            self._received[source] = buffer
            self._receives[source] = dist.irecv(buffer, src=global_rank(source), group=group)
        self._sends = []
        for destination, tensor in outgoing.items():
            tensor = tensor.contiguous()
            traffic.add(phase, tensor)
            # The tensor is kept until the send completes.
            self._sends.append((dist.isend(tensor, dst=global_rank(destination), group=group),
                                tensor))

    def wait(self, source: int) -> torch.Tensor:
        self._receives.pop(source).wait()
        return self._received.pop(source)

    def finish(self) -> None:
        """Waits for every send (and any receive not yet waited for)."""
        for work, _ in self._sends:
            work.wait()
        self._sends.clear()
        for source in list(self._receives):
            self.wait(source)
