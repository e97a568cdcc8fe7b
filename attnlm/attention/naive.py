"""The readable reference: materialise the (Tq, Tk) scores, cap, bias, mask, softmax, weight the
values. It defines what every attention option means; the other backends are tested against it."""

import torch
import torch.nn.functional as F

from attnlm.attention.masks import alibi_bias, relative_bias, visible


def scores(q, k, *, causal, scale, alibi_slopes=None, window=0, softcap=0.0, relative=None,
           additive=None):
    """The (B, H, Tq, Tk) scores that the softmax turns into probabilities, -inf where a query may
    not look. k has H or fewer heads (grouped-query attention): query head h reads key head
    h // (H / Hk)."""
    group = q.size(1) // k.size(1)
    k = k.repeat_interleave(group, dim=1)  # the reference may repeat; the kernels must not
    if additive is None:
        s = (q @ k.transpose(-2, -1)) * scale
    else:
        # Bahdanau: w_h · tanh(q_i + k_j), a (B, H, Tq, Tk, D) tensor on the way: the price of it.
        s = torch.tanh(q.unsqueeze(-2) + k.unsqueeze(-3)) @ additive.view(1, -1, 1, additive.size(-1), 1)
        s = s.squeeze(-1) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    tq, tk = q.size(-2), k.size(-2)
    if alibi_slopes is not None:
        s = s + alibi_bias(alibi_slopes, tq, tk, causal).to(s.dtype)
    if relative is not None:
        s = s + relative_bias(relative, tq, tk, causal).to(s.dtype)
    if causal or window:
        s = s.masked_fill(~visible(tq, tk, causal, window, q.device), float("-inf"))
    return s


def probabilities(q, k, **options):
    """The (B, H, Tq, Tk) attention probabilities (softmax accumulates in float32 in any dtype)."""
    return torch.softmax(scores(q, k, **options), dim=-1)


def attend(q, k, v, *, dropout_p=0.0, **options):
    probs = probabilities(q, k, **options)
    if dropout_p:
        probs = F.dropout(probs, dropout_p)
    group = q.size(1) // v.size(1)
    return probs @ v.repeat_interleave(group, dim=1)
