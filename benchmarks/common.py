"""What every benchmark line carries: the machine (its CPU model by name), torch and the thread
count. Figures from different CPU kinds differ; a figure without its CPU means little."""

import json
import os
import platform

import torch

from attnlm.utilisation import cpu_name


def machine():
    return {
        "cpu": cpu_name(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def emit(**record):
    print(json.dumps({**record, **machine()}), flush=True)
