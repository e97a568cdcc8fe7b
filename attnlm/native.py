"""C kernels for a decode step on the CPU, compiled on first use with the system's C compiler.

A cached decode step multiplies one vector per sample by every weight matrix and reads every
cached key and value once, so memory speed bounds it, not arithmetic. On the AMD EPYC this
project is measured on, torch's BLAS streams a matrix-vector product at 8.6 GB/s where a plain
sum reads 23.4; the loop in native.c, compiled for the machine at hand, reads 19.8
(benchmarks/native.py). One query's attention in C is about as fast as torch's SDPA alone,
but within a decode step it spares SDPA's per-call work and keeps the time per token flatter.

They serve only what they fit: float32 on the CPU, at most MAX_ROWS rows, nothing that autograd
records or autocast converts. Everything else, and everything on a machine without a C
compiler, stays with torch.
ATTNLM_NATIVE=0 turns them off (to compare, or to rule them out).
"""

import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

SOURCE = Path(__file__).with_name("native.c")
MAX_ROWS = 8  # more rows (a prompt's prefill, training) are a matrix product: BLAS's work
FLAG_SETS = (["-march=native"], [])  # for this CPU's vector width; plain where unsupported


def _cpu():
    """What -march=native depends on, so that a cache shared by machines keeps one build each."""
    described = platform.machine() + platform.processor()
    try:
        with open("/proc/cpuinfo") as f:  # Linux; x86 names flags, ARM features and parts
            return described + "".join(line for line in f if line.startswith(
                ("model name", "flags", "Features", "CPU implementer", "CPU part")))
    except OSError:
        return described


def _build(compiler, flags, directory):
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + "\0".join([compiler, *flags, _cpu()]).encode()).hexdigest()[:16]
    path = directory / f"decode-{key}.so"
    if not path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        fd, partial = tempfile.mkstemp(suffix=".so", dir=directory)
        os.close(fd)
        try:
            subprocess.run([compiler, "-O3", "-fPIC", "-shared", "-fopenmp-simd", "-fno-math-errno",
                            *flags, str(SOURCE), "-o", partial, "-lm"],
                           check=True, capture_output=True, timeout=120)
            os.replace(partial, path)  # whole or absent: runs in parallel may build at once
        finally:
            Path(partial).unlink(missing_ok=True)
    if hasattr(os, "getuid") and path.stat().st_uid != os.getuid():
        raise OSError(f"{path} belongs to another user")  # never load code someone else wrote
    return ctypes.CDLL(str(path))


@lru_cache(maxsize=None)
def library():
    """The compiled kernels, or None where they are off or cannot be built."""
    if os.environ.get("ATTNLM_NATIVE") == "0":
        return None
    from attnlm.data import cache_dir

    for flags in FLAG_SETS:
        try:
            lib = _build(os.environ.get("CC", "cc"), flags, cache_dir() / "native")
        except (OSError, subprocess.SubprocessError):
            continue
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        lib.linear.argtypes = [ptr] * 4 + [i64] * 3
        lib.attend_one.argtypes = [ptr] * 5 + [i64] * 5 + [ctypes.c_float, ptr]
        lib.linear.restype = lib.attend_one.restype = None
        return lib
    return None


def _fits(*tensors):
    """float32 CPU tensors that autograd would not record nor autocast convert (None stands for
    an absent bias)."""
    present = [t for t in tensors if t is not None]
    return (all(t.dtype == torch.float32 and t.device.type == "cpu" for t in present)
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in present))
            and not torch.is_autocast_enabled("cpu"))


def _ptr(t):
    return None if t is None else t.data_ptr()


def linear(x, weight, bias=None):
    """F.linear(x, weight, bias): by the C kernel for a few rows, by torch otherwise."""
    rows = x.numel() // max(x.size(-1), 1)
    shapes = (weight.dim() == 2 and weight.is_contiguous() and x.size(-1) == weight.size(1)
              and (bias is None or bias.shape == weight.shape[:1]))
    lib = library() if 0 < rows <= MAX_ROWS and shapes and _fits(x, weight, bias) else None
    if lib is None:
        return F.linear(x, weight, bias)
    x = x.contiguous()
    bias = bias.contiguous() if bias is not None else None  # kept alive through the call
    out = x.new_empty(*x.shape[:-1], weight.size(0))
    lib.linear(_ptr(x), _ptr(weight), _ptr(bias), _ptr(out), rows, weight.size(1), weight.size(0))
    return out


def attend_one(q, k, v, scale, alibi_slopes=None):
    """Attention of one query per head, q (B, H, 1, D), to all of k, v (B, H, T, D); None where
    the C kernel does not apply. k and v must be views of one layout whose rows of D are
    contiguous and whose heads are evenly spaced, as the filled part of a KV cache buffer is."""
    B, H, Tq, D = q.shape
    shapes = (Tq == 1 and k.shape == v.shape and k.shape[:2] == q.shape[:2] and k.size(3) == D
              and (alibi_slopes is None or alibi_slopes.shape == (H,)))
    evenly = (k.stride() == v.stride() and k.stride(3) == 1 and k.stride(2) == D
              and k.stride(0) == H * k.stride(1))
    lib = library() if shapes and evenly and _fits(q, k, v, alibi_slopes) else None
    if lib is None:
        return None
    q = q.contiguous()
    out = torch.empty_like(q)
    scores = q.new_empty(k.size(2))
    slopes = alibi_slopes.contiguous() if alibi_slopes is not None else None
    lib.attend_one(_ptr(q), _ptr(k), _ptr(v), _ptr(out), _ptr(scores), B, H, k.size(2), D,
                   k.stride(1), scale, _ptr(slopes))
    return out
