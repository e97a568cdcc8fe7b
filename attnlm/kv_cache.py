"""Preallocated per-layer key/value buffers, written in place as decoding advances."""

import torch


class KVCache:
    """Keys and values of every layer, each a (B, H, max_len, D) buffer allocated once, and how
    many positions of them are filled (`length`).

    A forward pass writes its positions' keys and values in place after the filled ones and
    attends to a view of the filled part: no concatenation and no new memory per step. It may
    use the first rows alone (a prompt read once for several samples; see `repeat`).
    """

    def __init__(self, n_layer, batch, n_head, max_len, head_dim, device=None, dtype=torch.float32):
        shape = (batch, n_head, max_len, head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.length = 0

    @property
    def max_len(self):
        return self.keys[0].size(2)

    def update(self, layer, k, v):
        """Store k, v (b, H, T, D) of rows 0..b-1 at positions length..length+T; return views of
        those rows' keys and values up to there. Every layer writes the same positions;
        `advance` then moves past them."""
        end = self.length + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; asked to write up to {end}")
        rows = k.size(0)
        keys, values = self.keys[layer][:rows], self.values[layer][:rows]
        keys.narrow(2, self.length, k.size(2)).copy_(k)
        values.narrow(2, self.length, v.size(2)).copy_(v)
        return keys.narrow(2, 0, end), values.narrow(2, 0, end)

    def advance(self, positions):
        self.length += positions

    def reset(self):
        """Start over at position 0 (what was stored is overwritten, never read)."""
        self.length = 0

    def repeat(self, rows):
        """Copy the filled part of rows 0..rows-1 into each further block of as many rows: row
        r's positions then serve rows r + rows, r + 2·rows, ... (each a sample of prompt r)."""
        for buffer in self.keys + self.values:
            filled = buffer.narrow(2, 0, self.length)
            for first in range(rows, buffer.size(0), rows):
                filled[first:first + rows].copy_(filled[:rows])
