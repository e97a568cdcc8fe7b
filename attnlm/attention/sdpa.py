"""torch's fused scaled_dot_product_attention: the speed reference."""

import torch.nn.functional as F

from attnlm.attention.masks import causal_mask


def attend(q, k, v, *, causal, scale, dropout_p=0.0):
    tq, tk = q.size(-2), k.size(-2)
    mask = None
    # torch's is_causal aligns the mask top-left; ours aligns the last query with the last key.
    if causal and tq != tk and tq > 1:
        mask = causal_mask(tq, tk, q.device)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal and tq == tk, scale=scale
    )
