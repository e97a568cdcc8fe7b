"""Attention backends behind one signature (attention/naive.py defines every option).

    attend(q, k, v, *, causal, scale, dropout_p=0.0, alibi_slopes=None, window=0, softcap=0.0,
           relative=None, additive=None) -> out

q is (B, H, Tq, D); k and v are (B, Hk, Tk, D) with Tk >= Tq and Hk dividing H (grouped-query
attention: query head h reads key/value head h // (H/Hk)). With `causal`, query i sits at
absolute position Tk - Tq + i and sees the keys up to that position, so the same call serves
training (Tq == Tk), prompt prefill and cached decoding (Tq < Tk). window > 0 keeps only the last
`window` of those keys; softcap > 0 turns each score s into softcap·tanh(s/softcap); alibi_slopes
(H,) adds ALiBi's bias and relative = (table, buckets) the learned relative bias (masks.py).
Every backend supports all of these; `additive` (Bahdanau's scores) only naive, dropout naive
and sdpa. tiled and triton compute masks, biases and the cap inside their tiles; sdpa takes masks
and biases as an explicit (H, Tq, Tk) mask and computes capped scores as naive does (sdpa.py).
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
    additive: bool = False  # supports additive scores (model.score=additive)
    cuda_only: bool = False
    package: str = ""  # an optional package it needs


BACKENDS = {
    "naive": Backend(naive.attend, dropout=True, additive=True),
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
