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
    if group > 1:
        k = k.repeat_interleave(group, dim=1)  # the reference may repeat; the kernels must not
    tq, tk = q.size(-2), k.size(-2)
    bias = score_bias(q, tq, tk, causal, alibi_slopes, window, relative)
    if additive is None and not softcap:
        return scaled_product(q, k, scale, bias)
    if additive is None:
        s = (q @ k.transpose(-2, -1)) * scale
    else:
        # Bahdanau: w_h · tanh(q_i + k_j), a (B, H, Tq, Tk, D) tensor on the way: the price of it.
        s = torch.tanh(q.unsqueeze(-2) + k.unsqueeze(-3)) @ additive.view(1, -1, 1, additive.size(-1), 1)
        s = s.squeeze(-1) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    return s if bias is None else s + bias.to(s.dtype)


def score_bias(q, tq, tk, causal, alibi_slopes, window, relative):
    """What is added to the scores, (1 or H, Tq, Tk): ALiBi's and the relative bias, and -inf
    where the mask hides a key; None when there is nothing to add."""
    bias = None
    if alibi_slopes is not None:
        bias = alibi_bias(alibi_slopes, tq, tk, causal)
    if relative is not None:
        more = relative_bias(relative, tq, tk, causal)
        bias = more if bias is None else bias + more
    if causal or window:
        hidden = ~visible(tq, tk, causal, window, q.device)
        bias = (q.new_zeros(1, tq, tk, dtype=torch.float32) if bias is None else bias)
        bias = bias.masked_fill(hidden, float("-inf"))
    return bias


def scaled_product(q, k, scale, bias):
    """scale·q·kᵀ + bias as one batched product (baddbmm): on a CPU, a pass of their own over
    the (B, H, Tq, Tk) scores for the scale and another for the mask cost as much as the product."""
    b, h, tq, d = q.shape
    tk = k.size(-2)
    q, k = q.reshape(b * h, tq, d), k.reshape(b * h, tk, d).transpose(1, 2)
    if bias is None:
        return torch.baddbmm(q.new_zeros(()), q, k, beta=0, alpha=scale).view(b, h, tq, tk)
    bias = bias.to(q.dtype)
    bias = bias[0] if bias.size(0) == 1 else bias.expand(b, h, tq, tk).reshape(b * h, tq, tk)
    return torch.baddbmm(bias, q, k, alpha=scale).view(b, h, tq, tk)


def probabilities(q, k, **options):
    """The (B, H, Tq, Tk) attention probabilities (softmax accumulates in float32 in any dtype)."""
    return torch.softmax(scores(q, k, **options), dim=-1)


def attend(q, k, v, *, dropout_p=0.0, **options):
    probs = probabilities(q, k, **options)
    if dropout_p:
        probs = F.dropout(probs, dropout_p)
    group = q.size(1) // v.size(1)
    return probs @ (v.repeat_interleave(group, dim=1) if group > 1 else v)
