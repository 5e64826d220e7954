"""Training the student on several processes with torch.distributed (`b2p train --processes N`, or torchrun).

Data parallel, and the same training as one process with the same global batch, up to float rounding:
  - every rank draws the whole global batch (the shuffle and each tile's random flip and origin, from the
    same seeded generators as one process: StudentDataset.draw) and builds only its share of it
    (`RankBatches`: rank r takes a contiguous slice), so the tiles of a step are those of one process;
  - the loss is the one of the global batch, not a mean of per-rank losses: its sums (cross-entropy and
    pixel counts, the Dice's soft counts) are summed over the ranks (`sum_across`, differentiable) before
    they are divided; every rank then holds the global loss;
  - BatchNorm layers in training mode normalise with the global batch's statistics (`GlobalBatchNorm2d`,
    which also runs on a CPU with gloo: torch's SyncBatchNorm needs a GPU);
  - the gradients are averaged over the ranks (`average_gradients`): with the global loss on every rank,
    whose backward through each `sum_across` sums the ranks' gradients, that average is the gradient of
    the global loss;
  - rank 0 validates, decides early stopping (told to the others) and writes the model folder.
The backends: gloo on a CPU, NCCL on GPUs (one per process, cuda:LOCAL_RANK). With N processes on C CPU cores
each process runs C // N torch threads.

Launching: `b2p train --processes N` starts N processes on this machine itself (spawn, a free TCP port on
127.0.0.1); torchrun (`torchrun --nproc-per-node N -m b2p train ...`, or several nodes) sets RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT, which are read instead.
"""

from __future__ import annotations

import contextlib
import os
import socket
from queue import Empty
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from b2p.errors import B2PError


@dataclass(frozen=True)
class Ranks:
    """Where this process stands: rank of world, its local rank and the device it trains on."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def torchrun_ranks() -> Ranks | None:
    """The ranks torchrun (or any launcher setting RANK / WORLD_SIZE) gave this process, else None."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return None
    try:
        return Ranks(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError:
        raise B2PError("RANK / WORLD_SIZE / LOCAL_RANK are not integers (set by a launcher?)") from None


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def rank_device(device: torch.device, ranks: Ranks) -> torch.device:
    """One GPU per process (cuda:LOCAL_RANK); the CPU is shared."""
    if device.type != "cuda" or not ranks.active:
        return device
    n = torch.cuda.device_count()
    if ranks.local_rank >= n:
        raise B2PError(f"{ranks.world} training processes on this node need {ranks.local_rank + 1} GPUs, but it has {n}")
    return torch.device("cuda", ranks.local_rank)


@contextlib.contextmanager
def process_group(ranks: Ranks, device: torch.device, init_method: str = "env://") -> Iterator[None]:
    """torch.distributed initialised for `ranks` (nothing for one process), destroyed afterwards."""
    if not ranks.active:
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend_for(device), init_method=init_method, rank=ranks.rank, world_size=ranks.world)
    try:
        yield
    finally:
        dist.destroy_process_group()


class _SumAcross(torch.autograd.Function):
    """All-reduce (sum) whose backward sums the gradients over the ranks as well (module docstring)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:  # noqa: D102
        out = t.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: D102
        g = grad.clone()
        dist.all_reduce(g)
        return g


def sum_across(t: torch.Tensor) -> torch.Tensor:
    """`t` summed over the ranks (differentiable); `t` itself without a process group."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    return _SumAcross.apply(t)


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that, in training with a process group, normalises with the statistics of the global batch
    (the per-channel count, sum and sum of squared deviations summed over the ranks, differentiably) and
    updates its running statistics with them as torch's BatchNorm does; in eval mode, or alone, it is
    BatchNorm2d. Two reductions per call (the mean first, then the deviations from it): no E[x^2] - E[x]^2
    cancellation. Its state dict is BatchNorm2d's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        xf = x if x.dtype == torch.float64 else x.float()  # statistics at least in float32 (autocast's inputs)
        dims = (0, 2, 3)
        n_local = torch.tensor([float(x.shape[0] * x.shape[2] * x.shape[3])], device=x.device, dtype=xf.dtype)
        stats = sum_across(torch.cat([n_local, xf.sum(dims)]))
        n, mean = stats[0], stats[1:] / stats[0]
        centred = xf - mean.view(1, -1, 1, 1)
        var = sum_across((centred * centred).sum(dims)) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = (1.0 / float(self.num_batches_tracked)) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * (n / (n - 1).clamp_min(1)), alpha=m)
        y = centred * torch.rsqrt(var + self.eps).view(1, -1, 1, 1)
        if self.affine:
            y = y * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return y.to(x.dtype)


def convert_batchnorm(module: nn.Module) -> nn.Module:
    """`module` with every BatchNorm2d replaced by a GlobalBatchNorm2d sharing its parameters and buffers."""
    if type(module) is nn.BatchNorm2d:
        ref = module.running_mean if module.running_mean is not None else module.weight
        new = GlobalBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        if ref is not None:
            new = new.to(ref.device, ref.dtype)
        new.load_state_dict(module.state_dict())
        if module.affine:
            new.weight, new.bias = module.weight, module.bias
        new.train(module.training)
        return new
    for name, child in module.named_children():
        new_child = convert_batchnorm(child)
        if new_child is not child:
            setattr(module, name, new_child)
    return module


def average_gradients(params: Sequence[torch.nn.Parameter]) -> None:
    """Each gradient replaced by its mean over the ranks, in one all-reduce (a no-op alone)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat.div_(dist.get_world_size())
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def broadcast_object(obj: Any, ranks: Ranks) -> Any:
    """Rank 0's `obj` on every rank (early stopping, so that every rank leaves the epoch loop together)."""
    if not ranks.active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sum_array(values, ranks: Ranks):
    """A numpy array summed over the ranks (confusion matrices of the training tiles)."""
    if not ranks.active:
        return values
    import numpy as np

    t = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float64))
    dist.all_reduce(t)
    return t.numpy().astype(values.dtype)


class RankBatches:
    """A batch sampler of this rank's share of each global batch: the global batches of `batch_sampler` (the
    same on every rank), each item's random plan drawn on every rank (`draw(k)`, the global generator's
    stream of one process), then rank r's contiguous slice of the plans. Each global batch must hold at
    least one item per rank."""

    def __init__(self, batch_sampler, draw: Callable[[int], Any], ranks: Ranks):
        self.batch_sampler, self.draw, self.ranks = batch_sampler, draw, ranks

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self):
        r, w = self.ranks.rank, self.ranks.world
        for batch in self.batch_sampler:
            plans = [self.draw(k) for k in batch]
            n = len(plans)
            yield plans[r * n // w : (r + 1) * n // w]


def check_global_batches(n_items: int, batch_size: int, world: int) -> None:
    """Refuse global batches that cannot give every rank at least one item (the last one of an epoch too)."""
    if world == 1:
        return
    if batch_size < world:
        raise B2PError(
            f"train.batch_size ({batch_size}) is the global batch: with {world} processes it must be at least {world} "
            "(one tile per process and step)"
        )
    last = n_items % batch_size
    if 0 < last < world:
        raise B2PError(
            f"an epoch's {n_items} tiles in global batches of {batch_size} leave a last batch of {last}, fewer than the "
            f"{world} processes: change batch_size or crops_per_image so that it is 0 or at least {world}"
        )


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for the processes' rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn: Callable[..., Any], processes: int, args: tuple) -> Any:
    """Run `fn(ranks, init_method, *args)` in `processes` new processes on this machine; returns rank 0's
    result. A B2PError in any process is raised here as it is (the first one)."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    init = f"tcp://127.0.0.1:{free_port()}"
    procs = [ctx.Process(target=_child, args=(fn, Ranks(r, processes, r), init, args, queue)) for r in range(processes)]
    for p in procs:
        p.start()
    results: dict[int, tuple[str, Any]] = {}
    try:
        while len(results) < processes and all(kind == "ok" for kind, _ in results.values()):
            try:
                rank, kind, value = queue.get(timeout=1.0)
                results[rank] = (kind, value)
            except Empty:
                dead = [r for r, p in enumerate(procs) if not p.is_alive() and r not in results]
                if dead:  # killed, or crashed in C code: it can no longer report
                    results[dead[0]] = ("crash", f"rank {dead[0]} died (exit code {procs[dead[0]].exitcode})")
    finally:
        for p in procs:  # the others wait in a collective for a rank that failed: a short grace, then stop them
            p.join(timeout=None if len(results) == processes and all(k == "ok" for k, _ in results.values()) else 5)
            if p.is_alive():
                p.kill()
                p.join()
    errors = [v for k, v in results.values() if k == "error"]
    if errors:
        raise B2PError(*errors[0])
    failed = [v for k, v in results.values() if k == "crash"]
    if failed:
        raise RuntimeError(f"a training process failed: {failed[0]}")
    return results[0][1]


def _child(fn, ranks: Ranks, init: str, args: tuple, queue) -> None:
    try:
        queue.put((ranks.rank, "ok", fn(ranks, init, *args)))
    except B2PError as e:
        queue.put((ranks.rank, "error", (e.problem, None if e.path is None else str(e.path))))
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it
        import traceback

        queue.put((ranks.rank, "crash", f"rank {ranks.rank}: {type(e).__name__}: {e}\n{traceback.format_exc()[-2000:]}"))
