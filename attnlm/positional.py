"""Positional schemes: how the model knows where each token sits.

    learned     a trained vector per position added to the embeddings; stops at block_size
    sinusoidal  fixed sines and cosines added to the embeddings; defined for any position
    rope        queries and keys rotated by angles proportional to their position (Su et al. 2021)
    alibi       a per-head penalty linear in the query-key distance, added to the scores
                (Press et al. 2022)
    none        nothing: the causal mask alone orders the tokens
"""

import math

import torch
from torch import nn

from attnlm.errors import InputError

SCHEMES = {
    "learned": "a trained vector per position, added to the token embeddings",
    "sinusoidal": "fixed sines and cosines per position, added to the token embeddings",
    "rope": "queries and keys rotated by their position (base model.rope_base)",
    "alibi": "a per-head penalty linear in the query-key distance, added to the scores",
    "none": "no positional information; the causal mask alone orders the tokens",
}


class Learned(nn.Module):
    """A trained vector per position; cannot go past the context it was built for."""

    def __init__(self, max_len, dim):
        super().__init__()
        self.table = nn.Embedding(max_len, dim)

    def forward(self, start, length):
        if start + length > self.table.num_embeddings:
            raise ValueError(
                f"learned positions stop at {self.table.num_embeddings}; "
                f"asked for position {start + length - 1}"
            )
        return self.table(torch.arange(start, start + length, device=self.table.weight.device))


def _frequencies(dim, base):
    """base^(-2i/dim) for i = 0 .. dim/2 - 1: one angular frequency per pair of dimensions."""
    return torch.exp(torch.arange(0, dim, 2) * (-math.log(base) / dim))


class Sinusoidal(nn.Module):
    """Fixed sines and cosines at geometrically spaced frequencies; defined for any position.
    Dimensions 2i and 2i+1 hold amplitude·sin and amplitude·cos of position·freq_i."""

    # The token embeddings' initial standard deviation (model.GPT). At amplitude 1 the positions
    # outweigh the tokens some 35 times and training is far slower: Tiny Shakespeare, the model of
    # configs/shakespeare_char.yaml, val loss after 250 and 1000 steps 3.36 and 2.57 at amplitude
    # 1, 2.43 and 2.15 at 0.02 (learned positions: 2.44 and 2.14).
    AMPLITUDE = 0.02

    def __init__(self, max_len, dim):
        super().__init__()
        self.register_buffer("freqs", _frequencies(dim, 10000.0), persistent=False)
        self.dim = dim

    def forward(self, start, length):
        pos = torch.arange(start, start + length, device=self.freqs.device, dtype=torch.float32)
        angles = pos.unsqueeze(1) * self.freqs
        table = torch.empty(length, self.dim, device=self.freqs.device)
        table[:, 0::2] = torch.sin(angles)
        table[:, 1::2] = torch.cos(angles[:, : self.dim // 2])
        return table * self.AMPLITUDE


ABSOLUTE = {"learned": Learned, "sinusoidal": Sinusoidal}


def build_absolute(scheme, max_len, dim):
    """The module that adds positions to the embeddings, or None for schemes that do not."""
    cls = ABSOLUTE.get(scheme)
    return cls(max_len, dim) if cls else None


class Rotary(nn.Module):
    """RoPE: rotate each pair of dimensions (i, i + D/2) of a head by position·base^(-2i/D).

    A query rotated by angle mθ and a key by nθ have the dot product of the unrotated pair with
    a rotation by (m - n)θ between them, so scores depend on positions only through m - n.
    Rotations keep norms. Pairing i with i + D/2 (rather than 2i with 2i+1) lets the rotation
    work on two contiguous halves."""

    def __init__(self, head_dim, base):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head dimension, not {head_dim}")
        self.register_buffer("freqs", _frequencies(head_dim, base), persistent=False)

    def forward(self, x, start):
        """x (B, H, T, D) at positions start .. start+T-1, rotated (in float32, returned in
        x's dtype)."""
        pos = torch.arange(start, start + x.size(-2), device=x.device, dtype=torch.float32)
        angles = pos.unsqueeze(1) * self.freqs  # (T, D/2)
        cos, sin = angles.cos(), angles.sin()
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def alibi_slopes(n_head):
    """ALiBi's per-head slopes: for H a power of two, the geometric sequence 2^(-8/H),
    2^(-16/H), .., 2^(-8); otherwise those of the power of two below H, then every other slope
    of the next power of two's sequence (those falling between them) until there are H."""
    def geometric(n):
        return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]

    below = 2 ** int(math.floor(math.log2(n_head)))
    slopes = geometric(below) + geometric(2 * below)[0::2][: n_head - below]
    return torch.tensor(slopes)


def check_context(scheme, trained, asked):
    """Raise InputError if a model trained at context `trained` cannot read `asked` tokens."""
    if asked > trained and scheme == "learned":
        raise InputError(f"model.pos=learned has positions only up to block_size={trained}; "
                         f"it cannot read {asked} tokens (sinusoidal, rope, alibi and none can)")
