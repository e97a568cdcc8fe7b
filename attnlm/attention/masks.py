import torch


def causal_mask(tq, tk, device=None):
    """Boolean (Tq, Tk) mask, True where query i (at absolute position tk - tq + i) may look."""
    rows = torch.arange(tk - tq, tk, device=device).unsqueeze(1)
    return torch.arange(tk, device=device).unsqueeze(0) <= rows


def alibi_bias(slopes, tq, tk, causal):
    """ALiBi's (H, Tq, Tk) bias: -slope · (query position - key position), with query i at
    absolute position tk - tq + i. Causal attention only sees keys at or before the query; without
    `causal` the distance is taken both ways, -slope · |query position - key position|."""
    rows = torch.arange(tk - tq, tk, device=slopes.device).unsqueeze(1)
    distance = (rows - torch.arange(tk, device=slopes.device)).float()
    if not causal:
        distance = distance.abs()
    return -slopes.float().view(-1, 1, 1) * distance
