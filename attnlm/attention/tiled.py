"""FlashAttention-2 in PyTorch operations: attention in tiles, with memory linear in T.

Queries are taken a block at a time against blocks of keys and values. An online softmax keeps,
for each query row, the running maximum m and sum l of exp(score - m); when a later key block
raises the maximum, the sum and the output accumulator are rescaled. Key blocks wholly right of
the causal diagonal are never computed and the mask is applied only to the tiles that cross it.
The forward saves only the output and each row's logsumexp; the backward recomputes every tile's
probabilities from the logsumexp (FlashAttention-2, Dao 2023, algorithm 2):

    P = exp(S - lse)   dV += Pᵀ dO   dP = dO Vᵀ   dS = P ∘ (dP - rowsum(dO ∘ O))
    dQ += dS K · scale   dK += dSᵀ Q · scale

On the CPU what costs time is the number of passes over each tile and Python's overhead per
operation, so every step is one batched matmul over all B·H heads into preallocated buffers, the
elementwise steps run in place, and the blocks are large. Scores are kept in base 2 (the scale is
multiplied by log2(e)) because torch's exp2 is about three times faster than exp on the CPU.
Everything is computed in float32 whatever the input dtype.

ALiBi's bias, -slope·(query position - key position), is added to each tile as it is computed,
from a (block_q, block_k) template of row-minus-column offsets made once per call: no Tq x Tk
tensor is ever built.
"""

import math

import torch

from attnlm.attention import naive

LOG2E = math.log2(math.e)

# (query block, key block) per device type. CPU: measured with benchmarks/attention.py --backends
# sdpa,tiled@QxK (B=1, H=8, D=64, float32, one thread, T from 1024 to 8192): 256x256 was the best
# or within 7% of the best of 128 to 512 (square and mixed) at every T, forward and backward;
# 128 pays Python's overhead per tile (1.28x sdpa's forward at T=8192) and 512 outgrows the cache
# (1.15 to 1.3x). CUDA: a guess, not yet measured.
DEFAULT_BLOCKS = {"cpu": (256, 256), "cuda": (128, 128)}


def attend(q, k, v, *, causal, scale, dropout_p=0.0, alibi_slopes=None, block_q=None,
           block_k=None):
    if dropout_p:
        raise ValueError("the tiled attention backend does not support attention dropout")
    if q.size(-2) == 1:
        # One query, as in each cached decoding step: its scores are a single row, already linear
        # in T, and tiling it would only add passes over the keys.
        return naive.attend(q, k, v, causal=causal, scale=scale, alibi_slopes=alibi_slopes)
    default_q, default_k = DEFAULT_BLOCKS.get(q.device.type, DEFAULT_BLOCKS["cpu"])
    return TiledAttention.apply(q, k, v, causal, scale, alibi_slopes, block_q or default_q,
                                block_k or default_k)


def _flat(x):
    """(B, H, T, D) of any float dtype -> contiguous float32 (B·H, T, D), copied only if needed."""
    return x.reshape(-1, x.size(-2), x.size(-1)).float().contiguous()


def _buffer(flat, *shape):
    """A contiguous view of shape `shape` at the front of a flat scratch buffer (the last tiles
    of a row or column are smaller than the block)."""
    return flat[: math.prod(shape)].view(shape)


def _mask_tile(s, i0, j0, offset):
    """Set to -inf the scores in tile s (rows from query i0, columns from key j0) whose key lies
    after the query's absolute position offset + i: column j is masked in row i when
    j - i > offset + i0 - j0. Adding one (rows, cols) bias is cheaper than masked_fill over B·H."""
    bias = torch.full(s.shape[1:], float("-inf"), device=s.device)
    s.add_(bias.triu_(offset + i0 - j0 + 1))


class _Alibi:
    """ALiBi's bias for the tiles: -slope·(query position - key position) (its absolute value
    without `causal`), in base 2 like the scores. Row n of the flattened (B·H, T, D) inputs is head
    n % H."""

    def __init__(self, slopes, batch, block_q, block_k, causal, device):
        self.neg_slopes = (slopes.float() * -LOG2E).repeat(batch).view(-1, 1, 1)
        # Row minus column in a whole tile; a tile's distances are these plus one offset.
        self.rel = (torch.arange(block_q, device=device).unsqueeze(1)
                    - torch.arange(block_k, device=device)).float()
        self.dist_buf = torch.empty(block_q * block_k, device=device)
        self.causal = causal

    def add_to(self, s, i0, j0, offset):
        """Add the bias to tile s, whose rows are queries from i0 (at absolute positions from
        offset + i0) and whose columns are keys from j0."""
        rows, cols = s.shape[1:]
        dist = torch.add(self.rel[:rows, :cols], offset + i0 - j0,
                         out=_buffer(self.dist_buf, rows, cols))
        if not self.causal:
            dist.abs_()
        s.addcmul_(self.neg_slopes, dist)


def _crosses_diagonal(i0, j1, offset):
    """Whether some key before j1 lies after query i0's absolute position (the tile needs the
    mask; every later query in the block sees further)."""
    return j1 - 1 > offset + i0


def forward(q, k, v, causal, scale, block_q, block_k, alibi=None):
    """q (N, Tq, D), k and v (N, Tk, D), all contiguous float32; alibi an _Alibi or None.
    Returns the output (N, Tq, D) and each row's logsumexp of the scores in base 2, (N, Tq)."""
    n, tq, d = q.shape
    tk = k.size(1)
    offset = tk - tq  # query i sits at absolute position offset + i
    c = scale * LOG2E
    out = torch.empty_like(q)
    lse = torch.empty(n, tq, device=q.device)
    q_buf = torch.empty(n * block_q * d, device=q.device)
    acc_buf = torch.empty(n * block_q * d, device=q.device)
    s_buf = torch.empty(n * block_q * block_k, device=q.device)
    for i0 in range(0, tq, block_q):
        i1 = min(i0 + block_q, tq)
        rows = i1 - i0
        qi = torch.mul(q[:, i0:i1], c, out=_buffer(q_buf, n, rows, d))
        acc = _buffer(acc_buf, n, rows, d).zero_()
        m = torch.full((n, rows, 1), float("-inf"), device=q.device)
        l = torch.zeros(n, rows, 1, device=q.device)
        # Blocks from key 0 upwards: every row sees key 0, so its first maximum is finite.
        k_end = min(tk, offset + i1) if causal else tk
        for j0 in range(0, k_end, block_k):
            j1 = min(j0 + block_k, k_end)
            s = torch.bmm(qi, k[:, j0:j1].transpose(1, 2), out=_buffer(s_buf, n, rows, j1 - j0))
            if alibi is not None:
                alibi.add_to(s, i0, j0, offset)
            if causal and _crosses_diagonal(i0, j1, offset):
                _mask_tile(s, i0, j0, offset)
            m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))
            correction = torch.exp2(m - m_new)
            s.sub_(m_new).exp2_()
            l.mul_(correction).add_(s.sum(dim=-1, keepdim=True))
            acc.mul_(correction).baddbmm_(s, v[:, j0:j1])
            m = m_new
        torch.div(acc, l, out=out[:, i0:i1])
        torch.add(m.squeeze(-1), l.squeeze(-1).log2(), out=lse[:, i0:i1])
    return out, lse


def backward(q, k, v, out, lse, grad_out, causal, scale, block_q, block_k, alibi=None):
    """Gradients of q, k and v (all (N, T, D) float32) given the forward's output and lse.
    Outer loop over key blocks (their dK and dV stay in one buffer), inner over query blocks."""
    n, tq, d = q.shape
    tk = k.size(1)
    offset = tk - tq
    c = scale * LOG2E
    delta = (grad_out * out).sum(dim=-1, keepdim=True)  # rowsum(dO ∘ O), (N, Tq, 1)
    neg_lse = lse.neg().unsqueeze(-1)
    dq = torch.zeros_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    s_buf = torch.empty(n * block_q * block_k, device=q.device)
    dp_buf = torch.empty(n * block_q * block_k, device=q.device)
    for j0 in range(0, tk, block_k):
        j1 = min(j0 + block_k, tk)
        kj, vj = k[:, j0:j1], v[:, j0:j1]
        dkj, dvj = dk[:, j0:j1].zero_(), dv[:, j0:j1].zero_()
        # Queries that see none of this block's keys are skipped.
        i_start = max(0, j0 - offset) if causal else 0
        for i0 in range(i_start, tq, block_q):
            i1 = min(i0 + block_q, tq)
            shape = (n, i1 - i0, j1 - j0)
            qi, doi = q[:, i0:i1], grad_out[:, i0:i1]
            # P = exp2(c·QKᵀ - lse), the subtraction folded into the matmul.
            p = torch.baddbmm(neg_lse[:, i0:i1], qi, kj.transpose(1, 2), alpha=c,
                              out=_buffer(s_buf, *shape))
            if alibi is not None:
                alibi.add_to(p, i0, j0, offset)
            if causal and _crosses_diagonal(i0, j1, offset):
                _mask_tile(p, i0, j0, offset)
            p.exp2_()
            dvj.baddbmm_(p.transpose(1, 2), doi)
            ds = torch.bmm(doi, vj.transpose(1, 2), out=_buffer(dp_buf, *shape))
            ds.sub_(delta[:, i0:i1]).mul_(p)
            dq[:, i0:i1].baddbmm_(ds, kj, alpha=scale)
            dkj.baddbmm_(ds.transpose(1, 2), qi, alpha=scale)
    return dq, dk, dv


class TiledAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale, slopes, block_q, block_k):
        # Autocast would run the matmuls in half precision; the tiles accumulate in float32.
        with torch.autocast(q.device.type, enabled=False):
            qf, kf, vf = _flat(q), _flat(k), _flat(v)
            alibi = None
            if slopes is not None:
                alibi = _Alibi(slopes, q.size(0), block_q, block_k, causal, q.device)
            out, lse = forward(qf, kf, vf, causal, scale, block_q, block_k, alibi)
        ctx.save_for_backward(qf, kf, vf, out, lse)
        ctx.args = (causal, scale, block_q, block_k, alibi)
        ctx.dtypes = (q.dtype, k.dtype, v.dtype)
        return out.view(q.shape).to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        with torch.autocast(q.device.type, enabled=False):
            grads = backward(q, k, v, out, lse, _flat(grad_out), *ctx.args)
        batch_heads = grad_out.shape[:2]
        dq, dk, dv = (g.view(*batch_heads, *g.shape[1:]).to(t) for g, t in zip(grads, ctx.dtypes))
        return dq, dk, dv, None, None, None, None, None
