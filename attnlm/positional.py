"""Positional schemes: how the model knows where each token sits.

    learned     a trained vector per position added to the embeddings; stops at block_size
    sinusoidal  fixed sines and cosines added to the embeddings; defined for any position
    rope        queries and keys rotated by angles proportional to their position (Su et al. 2021)
    alibi       a per-head penalty linear in the query-key distance, added to the scores
                (Press et al. 2022)
    relative    a learned per-head bias for each bucket of query-key distances, added to the
                scores (T5, Raffel et al. 2020)
    none        nothing: the causal mask alone orders the tokens
"""

import math

import torch
from torch import nn

from attnlm.attention.masks import relative_buckets
from attnlm.choices import POSITIONAL
from attnlm.errors import InputError

SCHEMES = {
    "learned": "a trained vector per position, added to the token embeddings",
    "sinusoidal": "fixed sines and cosines per position, added to the token embeddings",
    "rope": "queries and keys rotated by their position (base model.rope_base)",
    "alibi": "a per-head penalty linear in the query-key distance, added to the scores",
    "relative": "a learned per-head bias per bucket of query-key distances, added to the scores",
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


def _angles(start, end, dim, base, device):
    """(end - start, dim/2): position·base^(-2i/dim) for positions start .. end-1, one angular
    frequency per pair of dimensions. In float64: in float32 an angle far out (an endless
    generation gets past position 2^24, where float32 positions lose their units digit) would be
    off by radians."""
    positions = torch.arange(start, end, device=device, dtype=torch.float64)
    pairs = torch.arange(0, dim, 2, device=device, dtype=torch.float64)
    return positions.unsqueeze(1) * torch.exp(pairs * (-math.log(base) / dim))


class Sinusoidal(nn.Module):
    """Fixed sines and cosines at geometrically spaced frequencies; defined for any position.
    Dimensions 2i and 2i+1 hold amplitude·sin and amplitude·cos of position·freq_i."""

    # The token embeddings' initial standard deviation (model.GPT). At amplitude 1 the positions
    # outweigh the tokens some 35 times and training is far slower: Tiny Shakespeare, the model of
    # the shakespeare_char recipe, val loss after 250 and 1000 steps 3.36 and 2.57 at amplitude
    # 1, 2.43 and 2.15 at 0.02 (learned positions: 2.44 and 2.14).
    AMPLITUDE = 0.02

    def __init__(self, max_len, dim):
        super().__init__()
        self.dim = dim
        # Holds nothing: follows the model's device and dtype (model.to(torch.bfloat16)).
        self.register_buffer("anchor", torch.empty(0), persistent=False)

    def forward(self, start, length):
        device = self.anchor.device
        angles = _angles(start, start + length, self.dim, 10000.0, device)
        table = torch.empty(length, self.dim, device=device, dtype=torch.float64)
        table[:, 0::2] = torch.sin(angles)
        table[:, 1::2] = torch.cos(angles[:, : self.dim // 2])
        return (table * self.AMPLITUDE).to(self.anchor.dtype)  # rounded once


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

    # The most positions the kept tables cover beyond what one call needs. A model with sliding
    # windows generates without end: its tables then slide along, so memory stays bounded.
    KEPT_POSITIONS = 1 << 14

    def __init__(self, head_dim, base):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head dimension, not {head_dim}")
        self.head_dim, self.base = head_dim, base
        self._cos = self._sin = None  # tables over positions _first.., see _tables
        self._first = 0

    def _stretch(self, start, end, device):
        """cos and signed sin over both halves, (end - start, D)."""
        angles = _angles(start, end, self.head_dim, self.base, device)
        cos, sin = angles.cos().float(), angles.sin().float()
        return torch.cat((cos, cos), -1), torch.cat((-sin, sin), -1)

    def _tables(self, start, end, device):
        """The stretch for positions start .. end-1, from tables kept between calls (each layer
        rotates queries and keys at every step): grown on demand from position 0, and past
        KEPT_POSITIONS rebuilt from the position asked for."""
        if self._cos is None or self._cos.device != device or not (
                self._first <= start and end <= self._first + len(self._cos)):
            self._first = 0 if end <= self.KEPT_POSITIONS else start
            grown = min(2 * len(self._cos), self.KEPT_POSITIONS) if self._cos is not None else 0
            self._cos, self._sin = self._stretch(self._first, max(end, self._first + grown), device)
        i, j = start - self._first, end - self._first
        return self._cos[i:j], self._sin[i:j]

    def forward(self, x, start):
        """x (..., T, D) at positions start .. start+T-1, rotated in x's dtype."""
        cos, sin = self._tables(start, start + x.size(-2), x.device)
        return _Rotate.apply(x, cos, sin)


def _rotate(x, cos, sin):
    """(x1, x2) -> (x1·cos - x2·sin, x2·cos + x1·sin), with sin signed as (-sin, sin): the
    swapped halves times the signed sin. In x's dtype: under autocast x is already rounded to
    bfloat16 and will be again for the product with the keys; float32 would only add copies."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos.to(x.dtype) + torch.cat((x2, x1), -1) * sin.to(x.dtype)


class _Rotate(torch.autograd.Function):
    """A rotation whose gradient is the opposite rotation: four element-wise passes back instead
    of autograd's dozen, and nothing saved but the tables."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, -sin), None, None


class RelativeBias(nn.Module):
    """T5's learned relative position bias: per head, one trained bias for each bucket of
    query-key distances (attention.masks.relative_buckets). It starts at zero, a model without
    positions, and learns what distances matter; it is defined for any distance, so a model
    can read past block_size."""

    def __init__(self, n_head, num_buckets, max_distance):
        super().__init__()
        self.table = nn.Parameter(torch.zeros(n_head, num_buckets))
        self.max_distance = max_distance
        self._buckets = None  # bucket of each distance, grown on demand like Rotary's tables

    def forward(self, length):
        """(table, buckets) for the attention backends, buckets covering distances < length."""
        if self._buckets is None or len(self._buckets) < length \
                or self._buckets.device != self.table.device:
            size = max(length, 2 * len(self._buckets) if self._buckets is not None else 0)
            self._buckets = relative_buckets(size, self.table.size(1), self.max_distance,
                                             self.table.device)
        return self.table, self._buckets


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
                         f"it cannot read {asked} tokens "
                         f"({', '.join(p for p in POSITIONAL if p != 'learned')} can)")
