"""torch's fused scaled_dot_product_attention: the speed reference.

Grouped-query attention goes through torch's enable_gqa rather than keys and values repeated
here: as fast in training and 3 to 5 times faster for a decoding step (8 query heads, 2 or 1 key
heads, T=1024 and 4096, float32, one thread of an Intel Xeon with AMX).
A sliding window reaches it as an explicit boolean (Tq, Tk) mask (masks.visible). ALiBi and the
learned relative bias reach it only as an explicit float mask: an (H, Tq, Tk) tensor of biases
(-inf where a query may not look), H·Tq·Tk elements in q's dtype, 4 bytes each in float32 (8
heads at T=4096: 512 MiB), built on every call; the relative table's gradient flows back through
it. torch cannot use its flash kernel with such a mask. The tiled and triton backends compute
masks and biases inside their tiles instead.

Soft-capping (cap·tanh(score/cap)) has no place in the fused kernel, which applies nothing to
the scores between the matmul and the softmax; with a cap this backend computes attention as
naive does (scores materialised: memory and time quadratic in T) rather than refusing, so that
every model runs with the default backend. tiled computes the cap inside its tiles.
"""

import torch.nn.functional as F

from attnlm.attention import naive
from attnlm.attention.masks import visible


def attend(q, k, v, *, causal, scale, dropout_p=0.0, alibi_slopes=None, window=0, softcap=0.0,
           relative=None, additive=None):
    if additive is not None:
        raise ValueError("the sdpa attention backend scores by dot product only; additive "
                         "scores need the naive backend")
    if softcap:
        return naive.attend(q, k, v, causal=causal, scale=scale, dropout_p=dropout_p,
                            alibi_slopes=alibi_slopes, window=window, softcap=softcap,
                            relative=relative)
    tq, tk = q.size(-2), k.size(-2)
    mask = None
    if alibi_slopes is not None or relative is not None:
        mask = naive.score_bias(q, tq, tk, causal, alibi_slopes, window, relative).to(q.dtype)
    # torch's is_causal aligns the mask top-left; ours aligns the last query with the last key.
    elif window or (causal and tq != tk and tq > 1):
        mask = visible(tq, tk, causal, window, q.device)
    # Decided by an `if`: under torch.compile's dynamic shapes tq == tk is symbolic, and torch's
    # is_causal takes only a plain bool.
    is_causal = True if causal and mask is None and tq == tk else False
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
        enable_gqa=k.size(1) != q.size(1),
    )
