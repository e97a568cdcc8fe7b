"""Where and how computation runs: device, CPU threads, mixed precision."""

import contextlib
import ctypes
import os
import platform

import torch

from attnlm.errors import InputError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name):
    """The torch.device for a device name that config.validate accepted (auto, cpu, cuda,
    cuda:N); InputError if this machine lacks it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise InputError(f"device {name!r} asked for, but no CUDA device is available")
        if (device.index or 0) >= count:
            raise InputError(f"device {name!r} does not exist: this machine has {count} CUDA "
                             f"device{'s' if count > 1 else ''} (cuda:0 to cuda:{count - 1})")
    return device


def usable_cores():
    """The cores this process may run on: its CPU affinity where the system has one (taskset,
    SLURM's --cpus-per-task, a container's cpuset), else the machine's count."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def set_threads(threads):
    torch.set_num_threads(threads or usable_cores())


# glibc's mallopt parameters (malloc.h) and the size below which freed memory is kept for reuse.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
KEEP_FREED_BYTES = 1 << 30


def keep_freed_memory():
    """Have glibc's malloc keep freed blocks of up to 1 GiB for the next request rather than
    giving them back to the kernel. By default it maps each block over 32 MiB afresh and unmaps it
    when freed, so every training step faults its large activations in again page by page (half
    a million faults a step for the 6-layer, width-384 model at batch 64, a quarter of the step on
    two cores of an Intel Xeon). Whether it took effect; other C libraries are left as they are."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    return all(libc.mallopt(option, KEEP_FREED_BYTES) == 1
               for option in (M_MMAP_THRESHOLD, M_TRIM_THRESHOLD))


def autocast(device, dtype_name):
    """Mixed precision for the forward pass; float32 runs as is."""
    if dtype_name == "float32":
        return contextlib.nullcontext()
    if dtype_name == "float16" and device.type != "cuda":
        raise InputError("train.dtype='float16' needs a CUDA device; use bfloat16 on the CPU")
    return torch.autocast(device.type, dtype=DTYPES[dtype_name])


def slow_dtype_warning(device, dtype_name):
    """A warning line when dtype_name would run slower than float32 on device, else None."""
    if dtype_name != "bfloat16" or device.type != "cpu":
        return None
    try:  # whether oneDNN runs bfloat16 matrix products natively here
        native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return None
    if native:
        return None
    return "warning: this CPU has no bfloat16 instructions; train.dtype=float32 is likely faster"


def compiled(module, dynamic=None):
    """module under torch.compile. Inductor's compiled code is cached in attnlm's cache directory
    (one's own, not a shared temporary one; unless TORCHINDUCTOR_CACHE_DIR says otherwise), so a
    second run of the same model compiles faster."""
    from attnlm.token_cache import cache_dir

    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "inductor"))
    return torch.compile(module, dynamic=dynamic)
