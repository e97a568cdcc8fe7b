"""What every benchmark line carries: the machine (its CPU model by name), torch and the thread
count. Figures from different CPU kinds differ; a figure without its CPU means little."""

import json
import os
import platform

import torch

from attnlm.utilisation import cpu_name, cpuinfo


# CPU features that decide how fast low-precision matrix products can be
MATRIX_FLAGS = ("avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile")


def cpu_flags():
    """Those of MATRIX_FLAGS this CPU has (Linux; empty elsewhere)."""
    flags = (cpuinfo("flags") or "").split()
    return [flag for flag in MATRIX_FLAGS if flag in flags]


def machine():
    return {
        "cpu": cpu_name(),
        "cpu_flags": cpu_flags(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def emit(**record):
    print(json.dumps({**record, **machine()}), flush=True)
