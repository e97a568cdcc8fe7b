import torch


def causal_mask(tq, tk, device=None):
    """Boolean (Tq, Tk) mask, True where query i (at absolute position tk - tq + i) may look."""
    rows = torch.arange(tk - tq, tk, device=device).unsqueeze(1)
    return torch.arange(tk, device=device).unsqueeze(0) <= rows
