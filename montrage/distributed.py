"""The distributed protocol the Monitor speaks: rank, world size, broadcast, all-gather, barrier.

Every rank runs the Monitor and reaches every collective; only global rank 0 writes. `TorchDistributed` serves any
loop launched with torchrun or accelerate (torch.distributed's default group, or one process when there is none);
the Lightning adapter passes its strategy's collectives instead.
"""

from __future__ import annotations

from typing import Any, Protocol


class Distributed(Protocol):
    rank: int
    world_size: int

    def broadcast(self, obj: Any, src: int = 0) -> Any: ...

    def all_gather(self, obj: Any) -> list: ...

    def barrier(self, name: str) -> None: ...


class TorchDistributed:
    """torch.distributed's default process group when initialized, else a single process."""

    @staticmethod
    def _active() -> bool:
        import torch.distributed as dist

        return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    @property
    def rank(self) -> int:
        import torch.distributed as dist

        return dist.get_rank() if self._active() else 0

    @property
    def world_size(self) -> int:
        import torch.distributed as dist

        return dist.get_world_size() if self._active() else 1

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if not self._active():
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def all_gather(self, obj: Any) -> list:
        if not self._active():
            return [obj]
        import torch.distributed as dist

        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out

    def barrier(self, name: str) -> None:
        if self._active():
            import torch.distributed as dist

            dist.barrier()
