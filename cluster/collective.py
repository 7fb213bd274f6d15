"""The QueryWorkers' collective group: torch.distributed (gloo) all-reduces among them.

lr's partial gradient sums stay on the workers that evaluated the shards; the workers
add them among themselves (fqa.exact_sum over this group), so the driver only ever
sees scalars. The group is rebuilt whenever its membership changes (a worker restarted,
rebuilt or dropped): each membership is an *epoch*, with its own rendezvous store on
the rank-0 worker. gloo works on host tensors, where the sums already are (each shard's
sums reach the host once), on CPU and GPU workers alike.
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist


class CollectiveError(RuntimeError):
    """An all-reduce failed (a member died or timed out): the step's sum is incomplete,
    nothing was applied, and the driver re-runs the step on a rebuilt group."""


class WorkerGroup:
    """One epoch's gloo process group, built from a TCP store on the rank-0 worker."""

    def __init__(
        self,
        epoch: int,
        rank: int,
        size: int,
        host: str,
        port: int,
        timeout_s: float,
        store: dist.TCPStore | None = None,
    ) -> None:
        timeout = datetime.timedelta(seconds=timeout_s)
        self.epoch = epoch
        self.rank, self.size = rank, size
        try:
            if store is None:
                store = dist.TCPStore(host, port, size, is_master=False, timeout=timeout)
            self._store = store  # rank 0's store must outlive the group
            prefixed = dist.PrefixStore(f"epoch-{epoch}", store)
            self._group = dist.ProcessGroupGloo(prefixed, rank, size, timeout)
        except Exception as error:  # a member died before the group formed
            raise CollectiveError(f"group epoch {epoch} did not form: {error}") from error

    def max(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._all_reduce(tensor, dist.ReduceOp.MAX)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._all_reduce(tensor, dist.ReduceOp.SUM)

    def _all_reduce(self, tensor: torch.Tensor, op) -> torch.Tensor:
        options = dist.AllreduceOptions()
        options.reduceOp = op
        tensor = tensor.contiguous()
        try:
            self._group.allreduce([tensor], options).wait()
        except Exception as error:
            raise CollectiveError(
                f"all-reduce in group epoch {self.epoch} failed: {error}"
            ) from error
        return tensor


def host_store(size: int, timeout_s: float) -> dist.TCPStore:
    """Rank 0's rendezvous store on a free port of this node."""
    timeout = datetime.timedelta(seconds=timeout_s)
    return dist.TCPStore(
        "0.0.0.0", 0, size, is_master=True, wait_for_workers=False, timeout=timeout
    )
