"""What every benchmark line carries: the machine, torch and the thread count."""

import json
import os
import platform

import torch


def machine():
    return {
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def emit(**record):
    print(json.dumps({**record, **machine()}), flush=True)
