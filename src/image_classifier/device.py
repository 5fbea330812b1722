"""The one place that decides which device, numeric precision and inference batch the pipeline uses, and how a
training process uses its host (threads, freed memory)."""

import ctypes
import os
import platform
from pathlib import Path

import torch

from image_classifier.errors import UserError

# Forward passes on a CPU run fastest in small batches, whose activations stay in the caches, with the weights in
# channels_last: EfficientNet-Lite0 at 96 px scored 2,000 test images in 8.9 s so, against 30.4 s in batches of
# 1,000 in the default layout (docs/benchmarks.md, "Inference batch on the CPU").
# Accelerators want large batches.
CPU_INFERENCE_BATCH = 32
ACCELERATOR_INFERENCE_BATCH = 1000
# glibc's mallopt parameters, and what training sets them to. By default glibc returns freed memory over a
# threshold to the OS, and the next step faults the same pages in again, zeroed: three epochs of Fashion-MNIST's
# default training took 1.0-1.5 M page faults and 13.6-13.7 s so, 36 k and 10.5-11.7 s with freed memory kept
# (2-core AMD EPYC; docs/benchmarks.md, "What makes it fast").
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
# Blocks up to HEAP_UP_TO come from the reusable heap (256 MB changed nothing: a streamed 128-pixel epoch faulted
# 145 k times with 32 MB, 149 k with 256 MB); up to KEEP_FREED of free memory at the heap's top stays there.
HEAP_UP_TO = 32 * 2**20
KEEP_FREED = 2**30


def pick_device(requested: str) -> torch.device:
    """`auto` takes the available accelerator (CUDA, MPS, XPU, ...) else the CPU; a named one must exist."""
    if requested == "auto":
        if torch.accelerator.is_available():
            return torch.accelerator.current_accelerator()
        return torch.device("cpu")
    if requested != "cpu":
        backend = getattr(torch, requested, None)
        if backend is None or not backend.is_available():
            raise UserError(
                f"train.device = {requested!r} but no {requested.upper()} device is available here; "
                "use 'auto' or 'cpu'"
            )
    return torch.device(requested)


def describe(device: torch.device) -> str:
    """A readable name for logs and MLflow tags, e.g. 'cuda (NVIDIA H100 80GB HBM3)' or 'cpu (2 threads)'."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()})"
    return device.type


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on `device`: an accelerator runs asynchronously, so a clock read without this
    measures only the queueing. Nothing to wait for on the CPU."""
    if device.type != "cpu":
        torch.accelerator.synchronize()


def autocast_dtype(
    device: torch.device, precision: str, model: torch.nn.Module | None = None
) -> torch.dtype | None:
    """The autocast dtype for `train.precision`, or None for plain fp32.

    `auto` uses bf16 on accelerators and on CPUs with native bf16 (AVX512-BF16/AMX); on other CPUs bf16
    convolutions are emulated and run about 10x slower than fp32, so `auto` keeps fp32 there. On a CPU without
    AMX, `auto` also keeps fp32 for a `model` with depthwise convolutions: EfficientNet-Lite0 trained 1.75x faster
    in fp32 than in bf16 on a 2-core AMD EPYC with AVX512-BF16 (docs/benchmarks.md, fine-tuning).
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type != "cpu":
        return torch.bfloat16
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return None
    if model is not None and has_depthwise_convolutions(model) and not cpu_has_amx():
        return None
    return torch.bfloat16


def inference_batch_size(device: torch.device, requested: int | str = "auto") -> int:
    """Images per forward pass without gradients (validation, evaluate, calibration, export's check).

    `auto` is CPU_INFERENCE_BATCH on the CPU and ACCELERATOR_INFERENCE_BATCH elsewhere."""
    if requested != "auto":
        return int(requested)
    return CPU_INFERENCE_BATCH if device.type == "cpu" else ACCELERATOR_INFERENCE_BATCH


def inference_layout(model: torch.nn.Module) -> torch.nn.Module:
    """`model` with its weights in channels_last, converted in place and returned: inference's fastest layout on
    the CPU (see CPU_INFERENCE_BATCH). Only for a model that is then just evaluated: the exporters get the model
    as saved."""
    return model.to(memory_format=torch.channels_last)


def has_depthwise_convolutions(model: torch.nn.Module) -> bool:
    return any(
        isinstance(m, torch.nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels for m in model.modules()
    )


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX's bf16 tiles (Intel Xeon from Sapphire Rapids on), as Linux reports it."""
    try:
        return " amx_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def configure_host(threads: int, processes: int = 1) -> None:
    """Set this process up for training: `threads` CPU threads, or, when 0, its share of the cores it may run on;
    and, under glibc, freed memory kept for the next step (see M_TRIM_THRESHOLD). Resident memory stays near its
    peak instead of returning to the OS between steps: a streamed 128-pixel epoch held 11 MB more."""
    torch.set_num_threads(threads or max(1, len(os.sched_getaffinity(0)) // processes))
    if platform.libc_ver()[0] == "glibc":
        libc = ctypes.CDLL(None)  # the C library this process already runs on
        libc.mallopt(M_MMAP_THRESHOLD, HEAP_UP_TO)
        libc.mallopt(M_TRIM_THRESHOLD, KEEP_FREED)


def set_deterministic(enabled: bool, compiled: bool) -> None:
    """Deterministic kernels on or off (bit-identical reruns on the CPU).

    `torch.use_deterministic_algorithms` also imports torch._inductor to put its compiler in deterministic
    mode: 1.3 s of a small run's start-up (measured here, `python -X importtime`), for a compiler that only
    `train.compile` uses. Without compilation the kernels' own switch is set directly: the same flag the
    public function sets first."""
    if compiled:
        torch.use_deterministic_algorithms(enabled)
    else:
        torch._C._set_deterministic_algorithms(enabled)
