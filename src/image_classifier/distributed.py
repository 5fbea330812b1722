"""Data-parallel training across processes: `train.processes > 1` relaunches the train stage under torchrun.

One process per GPU (NCCL), or several CPU processes (gloo) for testing. Every process trains on its slice of
each global batch; DistributedDataParallel averages the gradients; only rank 0 writes outputs and logs.
"""

import contextlib
import os
import sys
from collections.abc import Iterator

import torch
import torch.distributed as dist


def is_worker() -> bool:
    """True inside a process torchrun started (it sets LOCAL_RANK)."""
    return "LOCAL_RANK" in os.environ


def relaunch(processes: int) -> None:
    """Replace this process with `torchrun --nproc-per-node N <this script>`; never returns."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={processes}",
        sys.argv[0],
        *sys.argv[1:],
    ]
    print(f"starting {processes} training processes: {' '.join(command[1:])}", flush=True)
    sys.stdout.flush()
    os.execv(sys.executable, command)


def local_device(device: torch.device) -> torch.device:
    """This process's device: its own GPU by LOCAL_RANK, or the CPU."""
    if device.type == "cpu" or not is_worker():
        return device
    return torch.device(device.type, int(os.environ["LOCAL_RANK"]))


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[tuple[int, int]]:
    """Join the process group torchrun set up (a no-op outside torchrun); yield (rank, world size)."""
    if not is_worker():
        yield 0, 1
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield dist.get_rank(), dist.get_world_size()
    finally:
        dist.destroy_process_group()


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def sum_across(*tensors: torch.Tensor) -> None:
    """Sum each tensor over all processes, in place (nothing to do in a single process)."""
    if rank_and_world()[1] > 1:
        for tensor in tensors:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


def max_across(tensor: torch.Tensor) -> None:
    if rank_and_world()[1] > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
