"""Masks and position biases over a (Tq, Tk) grid of scores, query i at absolute position
tk - tq + i. The naive backend builds them whole; sdpa takes them as a mask; tiled and triton
compute the same values tile by tile."""

import math

import torch


def distances(tq, tk, device=None):
    """(Tq, Tk) query position minus key position."""
    rows = torch.arange(tk - tq, tk, device=device).unsqueeze(1)
    return rows - torch.arange(tk, device=device)


def visible(tq, tk, causal, window=0, device=None):
    """Boolean (Tq, Tk) mask, True where a query may look: with `causal` the keys at or before
    its position, and with a window > 0 only the last `window` of those (itself included)."""
    if not causal:
        if window:
            raise ValueError("a sliding window needs causal attention")
        return torch.ones(tq, tk, dtype=torch.bool, device=device)
    distance = distances(tq, tk, device)
    seen = distance >= 0
    if window:
        seen &= distance < window
    return seen


def causal_mask(tq, tk, device=None):
    """Boolean (Tq, Tk) mask, True where query i (at absolute position tk - tq + i) may look."""
    return visible(tq, tk, causal=True, device=device)


def alibi_bias(slopes, tq, tk, causal):
    """ALiBi's (H, Tq, Tk) bias: -slope · (query position - key position), with query i at
    absolute position tk - tq + i. Causal attention only sees keys at or before the query; without
    `causal` the distance is taken both ways, -slope · |query position - key position|."""
    distance = distances(tq, tk, slopes.device).float()
    if not causal:
        distance = distance.abs()
    return -slopes.float().view(-1, 1, 1) * distance


def relative_buckets(length, num_buckets, max_distance, device=None):
    """T5's buckets for the distances 0 .. length-1 between a query and an earlier key, a (length,)
    long tensor: the first num_buckets/2 distances have a bucket each, the rest share buckets
    spaced logarithmically up to max_distance, and every distance from there on falls in the last.
    Without causal attention distances are taken both ways (|query - key|), sharing buckets."""
    exact = num_buckets // 2
    d = torch.arange(length, device=device)
    spread = torch.log(d.clamp(min=1).float() / exact) / math.log(max_distance / exact)
    far = (exact + (spread * (num_buckets - exact)).long()).clamp(max=num_buckets - 1)
    return torch.where(d < exact, d, far)


def relative_bias(relative, tq, tk, causal):
    """The (H, Tq, Tk) learned relative bias: relative = (table, buckets), table (H, num_buckets)
    of biases and buckets a (L,) map from distance to bucket, L >= tk."""
    table, buckets = relative
    distance = distances(tq, tk, table.device)
    distance = distance.abs() if not causal else distance.clamp(min=0)  # the rest is masked
    return table[:, buckets[distance]]
