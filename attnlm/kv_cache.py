"""Preallocated per-layer key/value buffers, written in place as decoding advances."""

import torch


class KVCache:
    """Keys and values of every layer, each a (B, H, max_len, D) buffer allocated once.

    Decoding writes the new position's keys and values in place and attends to a view of the
    filled part: no concatenation and no new memory per step. Writing at position 0 again
    starts over (the old entries past the new end are never read).
    """

    def __init__(self, n_layer, batch, n_head, max_len, head_dim, device=None, dtype=torch.float32):
        shape = (batch, n_head, max_len, head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]

    @property
    def max_len(self):
        return self.keys[0].size(2)

    def update(self, layer, k, v, pos):
        """Store k, v (B, H, T, D) at positions pos..pos+T; return views of every key and value
        up to there."""
        end = pos + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; asked to write up to {end}")
        keys, values = self.keys[layer], self.values[layer]
        keys.narrow(2, pos, k.size(2)).copy_(k)
        values.narrow(2, pos, v.size(2)).copy_(v)
        return keys.narrow(2, 0, end), values.narrow(2, 0, end)
