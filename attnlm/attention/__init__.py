"""Attention backends behind one signature.

    attend(q, k, v, *, causal, scale, dropout_p=0.0, alibi_slopes=None) -> out

q is (B, H, Tq, D); k and v are (B, H, Tk, D) with Tk >= Tq. With `causal`, query i sits at
absolute position Tk - Tq + i and sees the keys up to that position, so the same call serves
training (Tq == Tk), prompt prefill and cached decoding (Tq < Tk). alibi_slopes, an (H,) tensor,
adds ALiBi's bias -slope·(query position - key position) to the scores (the absolute distance
without `causal`; see masks.alibi_bias). Every backend supports it.
"""

import importlib.util
import os
from dataclasses import dataclass
from typing import Callable

from attnlm.attention import naive, sdpa, tiled
from attnlm.errors import InputError


def _triton_attend(*args, **kwargs):
    from attnlm.attention import triton_kernel  # imports the optional triton package

    return triton_kernel.attend(*args, **kwargs)


@dataclass(frozen=True)
class Backend:
    attend: Callable
    dropout: bool  # supports dropout on the attention probabilities
    cuda_only: bool = False
    package: str = ""  # an optional package it needs


BACKENDS = {
    "naive": Backend(naive.attend, dropout=True),
    "sdpa": Backend(sdpa.attend, dropout=True),
    "tiled": Backend(tiled.attend, dropout=False),
    "triton": Backend(_triton_attend, dropout=False, cuda_only=True, package="triton"),
}


def get_backend(name):
    return BACKENDS[name].attend


def check_backend(name, device):
    """Raise InputError, before any work starts, if backend `name` cannot run on `device` (a
    torch.device) here. Config values (dropout) are checked by config.validate."""
    backend = BACKENDS[name]
    if backend.package and importlib.util.find_spec(backend.package) is None:
        raise InputError(f"model.attention={name!r} needs the {backend.package} package: "
                         f"pip install 'attnlm[{backend.package}]'")
    # The Triton interpreter (TRITON_INTERPRET=1) runs the kernels on the CPU, slowly: for tests.
    interpreted = backend.package == "triton" and os.environ.get("TRITON_INTERPRET") == "1"
    if backend.cuda_only and device.type != "cuda" and not interpreted:
        raise InputError(f"model.attention={name!r} needs a CUDA device, not {device.type}; "
                         "use tiled or sdpa on the CPU")
