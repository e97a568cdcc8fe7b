"""What every benchmark line carries: the machine, torch and the thread count."""

import json
import os
import platform

import torch


def cpu_model():
    """The CPU's name (from /proc/cpuinfo on Linux): figures from two machines must not mix."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine():
    return {
        "cpu": cpu_model(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def emit(**record):
    print(json.dumps({**record, **machine()}), flush=True)
