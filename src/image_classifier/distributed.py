"""Data-parallel training across processes: `train.processes > 1` (per machine) or `train.nodes > 1` (machines)
relaunches the train stage under torchrun.

One process per GPU (NCCL), or several CPU processes (gloo) for testing. Every process trains on its slice of
each global batch; DistributedDataParallel averages the gradients; only rank 0 writes outputs and logs.

On several machines every machine runs the same stage command; which machine it is comes from the environment,
in torchrun's own variable names (what a Kubernetes PyTorchJob or TrainJob sets, and what a SLURM script
exports): PET_NODE_RANK (0 on the machine where DVC runs the stage), PET_MASTER_ADDR and PET_MASTER_PORT
(node 0's address, where the rendezvous waits).
"""

import contextlib
import os
import sys
from collections.abc import Iterator, Mapping

import torch
import torch.distributed as dist

from image_classifier.errors import UserError

# torchrun's default rendezvous port, used when PET_MASTER_PORT is not set.
DEFAULT_MASTER_PORT = "29500"


def is_worker() -> bool:
    """True inside a process torchrun started (it sets LOCAL_RANK)."""
    return "LOCAL_RANK" in os.environ


def launch_args(processes: int, nodes: int, env: Mapping[str, str]) -> list[str]:
    """torchrun's options: `--standalone` on one machine. On several, a static rendezvous at node 0 with this
    machine's node rank: ranks are then node rank × processes + local rank, so global rank 0, the one that writes
    outputs and logs, runs on node 0, beside DVC (an elastic c10d rendezvous would hand rank 0 to any machine)."""
    if nodes == 1:
        return ["--standalone", f"--nproc-per-node={processes}"]
    missing = [name for name in ("PET_NODE_RANK", "PET_MASTER_ADDR") if not env.get(name)]
    if missing:
        raise UserError(
            f"train.nodes = {nodes} needs {' and '.join(missing)} in the environment: PET_NODE_RANK is this "
            "machine's number (0 on the one that runs dvc repro), PET_MASTER_ADDR node 0's address "
            "(docs/scaling.md, On several machines)"
        )
    launcher_nodes = env.get("PET_NNODES", "")
    if launcher_nodes.isdigit() and int(launcher_nodes) != nodes:
        raise UserError(
            f"train.nodes = {nodes}, but this job has PET_NNODES = {launcher_nodes} machines: make them agree"
        )
    rank = env["PET_NODE_RANK"]
    if not rank.isdigit() or int(rank) >= nodes:
        raise UserError(
            f"PET_NODE_RANK = {rank!r}: this machine's number, 0 to {nodes - 1} (train.nodes = {nodes})"
        )
    port = env.get("PET_MASTER_PORT") or DEFAULT_MASTER_PORT
    return [
        f"--nnodes={nodes}",
        f"--nproc-per-node={processes}",
        "--rdzv-backend=static",  # even where a job's environment sets PET_RDZV_BACKEND=c10d
        f"--node-rank={rank}",
        f"--master-addr={env['PET_MASTER_ADDR']}",
        f"--master-port={port}",
    ]


def relaunch(processes: int, nodes: int = 1) -> None:
    """Replace this process with `torchrun <launch_args> <this script>`; never returns."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *launch_args(processes, nodes, os.environ),
        sys.argv[0],
        *sys.argv[1:],
    ]
    where = f" on each of {nodes} machines" if nodes > 1 else ""
    print(f"starting {processes} training processes{where}: {' '.join(command[1:])}", flush=True)
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
