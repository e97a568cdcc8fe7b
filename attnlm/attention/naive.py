"""The readable reference: materialise the (Tq, Tk) scores, mask, softmax, weight the values."""

import torch
import torch.nn.functional as F

from attnlm.attention.masks import alibi_bias, causal_mask


def attend(q, k, v, *, causal, scale, dropout_p=0.0, alibi_slopes=None):
    scores = (q @ k.transpose(-2, -1)) * scale
    if alibi_slopes is not None:
        scores = scores + alibi_bias(alibi_slopes, q.size(-2), k.size(-2), causal).to(q.dtype)
    if causal:
        scores = scores.masked_fill(~causal_mask(q.size(-2), k.size(-2), q.device), float("-inf"))
    probs = torch.softmax(scores, dim=-1)  # accumulates in float32 whatever the dtype
    if dropout_p:
        probs = F.dropout(probs, dropout_p)
    return probs @ v
