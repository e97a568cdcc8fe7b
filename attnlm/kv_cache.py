"""Preallocated per-layer key/value buffers, written in place as decoding advances."""

import torch


class KVCache:
    def __init__(self, n_layer, batch, n_head, max_len, head_dim, device=None, dtype=torch.float32):
        shape = (n_layer, batch, n_head, max_len, head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)

    @property
    def max_len(self):
        return self.keys.size(3)

    def update(self, layer, k, v, pos):
        """Store k, v (B, H, T, D) at positions pos..pos+T; return every key and value so far."""
        end = pos + k.size(2)
        self.keys[layer, :, :, pos:end] = k
        self.values[layer, :, :, pos:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]
