"""Attention backends behind one signature.

    attend(q, k, v, *, causal, scale, dropout_p=0.0) -> out

q is (B, H, Tq, D); k and v are (B, H, Tk, D) with Tk >= Tq. With `causal`, query i sits at
absolute position Tk - Tq + i and sees the keys up to that position, so the same call serves
training (Tq == Tk), prompt prefill and cached decoding (Tq < Tk).
"""

from dataclasses import dataclass
from typing import Callable

from attnlm.attention import naive, sdpa


@dataclass(frozen=True)
class Backend:
    attend: Callable
    dropout: bool  # supports dropout on the attention probabilities


BACKENDS = {
    "naive": Backend(naive.attend, dropout=True),
    "sdpa": Backend(sdpa.attend, dropout=True),
}


def get_backend(name):
    return BACKENDS[name].attend
