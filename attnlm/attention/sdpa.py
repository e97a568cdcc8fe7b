"""torch's fused scaled_dot_product_attention: the speed reference.

ALiBi reaches it only as an explicit float mask: an (H, Tq, Tk) tensor of biases (-inf where
causal attention may not look), H·Tq·Tk elements in q's dtype, 4 bytes each in float32 (8 heads
at T=4096: 512 MiB), built on every call; and torch cannot use its flash kernel with such a
mask. The tiled and triton backends compute the bias inside their tiles instead.
"""

import torch.nn.functional as F

from attnlm.attention.masks import alibi_bias, causal_mask


def attend(q, k, v, *, causal, scale, dropout_p=0.0, alibi_slopes=None):
    tq, tk = q.size(-2), k.size(-2)
    mask = None
    if alibi_slopes is not None:
        mask = alibi_bias(alibi_slopes, tq, tk, causal)
        if causal:
            mask = mask.masked_fill(~causal_mask(tq, tk, q.device), float("-inf"))
        mask = mask.to(q.dtype)
    # torch's is_causal aligns the mask top-left; ours aligns the last query with the last key.
    elif causal and tq != tk and tq > 1:
        mask = causal_mask(tq, tk, q.device)
    # Decided by an `if`: under torch.compile's dynamic shapes tq == tk is symbolic, and torch's
    # is_causal takes only a plain bool.
    is_causal = True if causal and mask is None and tq == tk else False
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale
    )
