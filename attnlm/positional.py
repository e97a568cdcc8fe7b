"""Positional schemes that add a vector per absolute position to the token embeddings."""

import math

import torch
from torch import nn


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


class Sinusoidal(nn.Module):
    """Fixed sines and cosines at geometrically spaced frequencies; defined for any position."""

    def __init__(self, max_len, dim):
        super().__init__()
        self.register_buffer("freqs", torch.exp(torch.arange(0, dim, 2) * (-math.log(10000.0) / dim)),
                             persistent=False)
        self.dim = dim

    def forward(self, start, length):
        pos = torch.arange(start, start + length, device=self.freqs.device, dtype=torch.float32)
        angles = pos.unsqueeze(1) * self.freqs
        table = torch.empty(length, self.dim, device=self.freqs.device)
        table[:, 0::2] = torch.sin(angles)
        table[:, 1::2] = torch.cos(angles[:, : self.dim // 2])
        return table


# None: no positional information; the causal mask alone orders the tokens.
SCHEMES = {"learned": Learned, "sinusoidal": Sinusoidal, "none": None}


def build_absolute(scheme, max_len, dim):
    cls = SCHEMES[scheme]
    return cls(max_len, dim) if cls else None
