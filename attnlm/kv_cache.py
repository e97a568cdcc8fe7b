"""Per-layer key/value buffers, allocated once and written in place as decoding advances.

A full-attention layer keeps every position up to max_len. A sliding-window layer's queries see
only the last `window` positions, so it keeps a ring of `window` slots, whatever the length of
the text: a model whose layers are all windowed decodes without end in constant memory.
"""

import torch


class _Layer:
    """One layer's keys and values, each a (B, H, slots, D) buffer."""

    def __init__(self, slots, batch, n_head, head_dim, device, dtype):
        shape = (batch, n_head, slots, head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)

    @property
    def nbytes(self):
        return self.keys.nbytes + self.values.nbytes


class FullLayer(_Layer):
    """Position p at slot p; max_len slots."""

    def write(self, k, v, start):
        """Store k, v (b, H, T, D) of rows 0..b-1 at positions start..start+T; return views of
        those rows' keys and values at positions 0..start+T."""
        rows, end = k.size(0), start + k.size(2)
        keys, values = self.keys[:rows], self.values[:rows]
        keys.narrow(2, start, k.size(2)).copy_(k)
        values.narrow(2, start, v.size(2)).copy_(v)
        return keys.narrow(2, 0, end), values.narrow(2, 0, end)

    def filled(self, length):
        return self.keys.narrow(2, 0, length), self.values.narrow(2, 0, length)


class RingLayer(_Layer):
    """A sliding-window layer's ring: position p at slot p % window and again at p % window +
    window (2·window slots), so that any `window` consecutive positions are one contiguous
    view, in position order, for attention to read without a copy."""

    def __init__(self, window, batch, n_head, head_dim, device, dtype):
        super().__init__(2 * window, batch, n_head, head_dim, device, dtype)
        self.window = window

    def write(self, k, v, start):
        """Store k, v (b, H, T, D) of rows 0..b-1 at positions start..start+T; return those
        rows' keys and values at positions start-window+1..start+T (from 0 near the start): the
        new ones and every earlier one that a new query sees."""
        rows, new = k.size(0), k.size(2)
        kept = min(self.window - 1, start)
        if kept + new <= self.window:  # a decode step: one view of the ring
            self._store(k, v, start)
            slot = (start - kept) % self.window
            return (self.keys[:rows].narrow(2, slot, kept + new),
                    self.values[:rows].narrow(2, slot, kept + new))
        # A chunk longer than the ring (a prompt): the earlier positions it sees, then the chunk,
        # copied together once; the ring keeps the chunk's last `window` positions.
        slot = (start - kept) % self.window
        keys = torch.cat([self.keys[:rows].narrow(2, slot, kept), k], dim=2)
        values = torch.cat([self.values[:rows].narrow(2, slot, kept), v], dim=2)
        tail = min(new, self.window)
        self._store(k[:, :, new - tail:], v[:, :, new - tail:], start + new - tail)
        return keys, values

    def _store(self, k, v, first):
        """Write positions first..first+T (T <= window) at both of their slots."""
        count, slot = k.size(2), first % self.window
        below = min(count, self.window - slot)  # those whose slot is under `window`
        for buffer, new in ((self.keys, k), (self.values, v)):
            buffer = buffer[:k.size(0)]
            buffer.narrow(2, slot, count).copy_(new)
            buffer.narrow(2, slot + self.window, below).copy_(new[:, :, :below])
            if count > below:
                buffer.narrow(2, 0, count - below).copy_(new[:, :, below:])

    def filled(self, length):
        return self.keys, self.values


class KVCache:
    """Keys and values of every layer, and how many positions have been written (`length`).

    windows: one per layer, 0 for full attention. A forward pass writes its positions' keys and
    values in place after the written ones and attends to a view of what its queries see: no new
    memory per step. It may use the first rows alone (a prompt read once for several samples;
    see `repeat`). n_head is the number of key/value heads (grouped-query attention keeps fewer
    than the queries have, and the cache shrinks with them).
    """

    def __init__(self, windows, batch, n_head, max_len, head_dim, device=None,
                 dtype=torch.float32):
        def layer(window):
            if 0 < window < max_len:
                return RingLayer(window, batch, n_head, head_dim, device, dtype)
            return FullLayer(max_len, batch, n_head, head_dim, device, dtype)

        self.layers = [layer(window) for window in windows]
        self.max_len = max_len
        self.length = 0

    @property
    def nbytes(self):
        """Bytes of all buffers: fixed once the cache is built."""
        return sum(layer.nbytes for layer in self.layers)

    def update(self, layer, k, v):
        """Store k, v (b, H, T, D) of rows 0..b-1 at positions length..length+T; return views of
        those rows' keys and values in position order, ending with the new ones: every position
        from 0 in a full layer, at least the window-1 before the new ones in a windowed one.
        Every layer writes the same positions; `advance` then moves past them."""
        end = self.length + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; asked to write up to {end}")
        return self.layers[layer].write(k, v, self.length)

    def advance(self, positions):
        self.length += positions

    def reset(self):
        """Start over at position 0 (what was stored is overwritten, never read)."""
        self.length = 0

    def repeat(self, rows):
        """Copy what rows 0..rows-1 hold into each further block of as many rows: row r's
        positions then serve rows r + rows, r + 2·rows, ... (each a sample of prompt r)."""
        for layer in self.layers:
            for filled in layer.filled(self.length):
                for first in range(rows, filled.size(0), rows):
                    filled[first:first + rows].copy_(filled[:rows])
