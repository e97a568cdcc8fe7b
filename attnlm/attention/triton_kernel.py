"""The tiled algorithm (see tiled.py) as Triton kernels for CUDA: FlashAttention-2's forward and
backward, one program per block of rows. Needs the optional `triton` package.

Each program keeps its tiles in registers: the forward holds a block of queries and walks the key
blocks; the backward's dK/dV kernel holds a block of keys and walks the query blocks, and its dQ
kernel holds a block of queries and walks the key blocks, so no two programs write the same
gradient (no atomics: the result is deterministic). Key blocks are walked in two phases: first
those every row of the block sees whole (no mask), then those that cross the causal diagonal or
the end of the keys (masked). Scores are in base 2, as in tiled.py. Operands keep the input dtype
(tensor cores for 16-bit inputs); products and statistics accumulate in float32.

ALiBi's bias, -slope·(query position - key position), is computed inside every tile from the
row and column indices (ALIBI is a compile-time switch; without it the kernels are unchanged).

On the CPU, TRITON_INTERPRET=1 runs these kernels in NumPy (slowly): that is how the tests check
them on a machine without a GPU.
"""

import math

import torch
import triton
import triton.language as tl

LOG2E = math.log2(math.e)
BLOCKS = (64, 64)  # (query block, key block) on CUDA: a common choice for D <= 128; not measured


@triton.jit
def _load_rows(base, rows, n_rows, offs_d, D: tl.constexpr, other):
    """Rows `rows` of a (n_rows, D) matrix as (len(rows), BLOCK_D), out-of-range entries `other`."""
    mask = (rows[:, None] < n_rows) & (offs_d[None, :] < D)
    return tl.load(base + rows[:, None] * D + offs_d[None, :], mask=mask, other=other)


@triton.jit
def _store_rows(base, rows, n_rows, offs_d, D: tl.constexpr, value):
    """Write `value` into rows `rows` of a (n_rows, D) matrix, out-of-range entries left out."""
    mask = (rows[:, None] < n_rows) & (offs_d[None, :] < D)
    tl.store(base + rows[:, None] * D + offs_d[None, :], value.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _visible(rows, cols, tk, offset, CAUSAL: tl.constexpr):
    """Which (row, column) pairs are real keys that the query may see; rows and cols come
    broadcastable, as (M, 1) and (1, N) or transposed."""
    visible = cols < tk
    if CAUSAL:
        visible &= cols <= offset + rows
    return visible


@triton.jit
def _alibi(rows, cols, offset, neg_slope, CAUSAL: tl.constexpr):
    """ALiBi's bias in base 2 for query rows and key columns (broadcastable, as for _visible):
    -slope·(query position - key position), its absolute value without CAUSAL."""
    distance = (offset + rows - cols).to(tl.float32)
    if not CAUSAL:
        distance = tl.abs(distance)
    return neg_slope * distance


@triton.jit
def _biased(s, rows, cols, tk, offset, neg_slope, CAUSAL: tl.constexpr, ALIBI: tl.constexpr,
            MASKED: tl.constexpr):
    """A tile of base-2 scores s with ALiBi's bias added and what a query may not see at -inf
    (rows and cols broadcastable as for _visible)."""
    if ALIBI:
        s += _alibi(rows, cols, offset, neg_slope, CAUSAL)
    if MASKED:
        s = tl.where(_visible(rows, cols, tk, offset, CAUSAL), s, float("-inf"))
    return s


@triton.jit
def _key_phases(m0, tq, tk, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """For the query rows from m0: key blocks in [0, lo) need no mask, those in [lo, hi) do."""
    offset = tk - tq
    if CAUSAL:
        lo = (offset + m0 + 1) // BLOCK_N * BLOCK_N  # keys up to offset + m0 are seen by every row
        hi = tl.minimum(tk, offset + m0 + BLOCK_M)
    else:
        lo = tk // BLOCK_N * BLOCK_N
        hi = tk
    return lo, hi


@triton.jit
def _fwd_tiles(acc, m_i, l_i, q, k_base, v_base, rows, offs_n, offs_d, start, stop, tk, offset, c,
               neg_slope, CAUSAL: tl.constexpr, ALIBI: tl.constexpr, MASKED: tl.constexpr,
               D: tl.constexpr, BLOCK_N: tl.constexpr):
    for n0 in range(start, stop, BLOCK_N):
        cols = n0 + offs_n
        k = _load_rows(k_base, cols, tk, offs_d, D, 0.0)
        v = _load_rows(v_base, cols, tk, offs_d, D, 0.0)
        s = _biased(tl.dot(q, tl.trans(k), input_precision="ieee") * c, rows[:, None],
                    cols[None, :], tk, offset, neg_slope, CAUSAL, ALIBI, MASKED)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        correction = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * correction + tl.sum(p, 1)
        acc = acc * correction[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _fwd_kernel(Q, K, V, Out, Lse, NegSlopes, n_head, tq, tk, c, CAUSAL: tl.constexpr,
                ALIBI: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    m0 = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    offset = tk - tq
    rows = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q + bh * tq * D, rows, tq, offs_d, D, 0.0)
    k_base, v_base = K + bh * tk * D, V + bh * tk * D
    neg_slope = tl.load(NegSlopes + bh % n_head)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    lo, hi = _key_phases(m0, tq, tk, CAUSAL, BLOCK_M, BLOCK_N)
    # Unmasked blocks first, from key 0, which every row sees: each row's first maximum is finite.
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, k_base, v_base, rows, offs_n, offs_d, 0, lo, tk,
                               offset, c, neg_slope, CAUSAL, ALIBI, False, D, BLOCK_N)
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, k_base, v_base, rows, offs_n, offs_d, lo, hi, tk,
                               offset, c, neg_slope, CAUSAL, ALIBI, True, D, BLOCK_N)
    _store_rows(Out + bh * tq * D, rows, tq, offs_d, D, acc / l_i[:, None])
    tl.store(Lse + bh * tq + rows, m_i + tl.log2(l_i), mask=rows < tq)


@triton.jit
def _dq_tiles(dq, q, do, lse, delta, k_base, v_base, rows, offs_n, offs_d, start, stop, tk,
              offset, c, neg_slope, CAUSAL: tl.constexpr, ALIBI: tl.constexpr,
              MASKED: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr):
    for n0 in range(start, stop, BLOCK_N):
        cols = n0 + offs_n
        k = _load_rows(k_base, cols, tk, offs_d, D, 0.0)
        v = _load_rows(v_base, cols, tk, offs_d, D, 0.0)
        s = _biased(tl.dot(q, tl.trans(k), input_precision="ieee") * c - lse[:, None],
                    rows[:, None], cols[None, :], tk, offset, neg_slope, CAUSAL, ALIBI, MASKED)
        p = tl.exp2(s)
        dp = tl.dot(do, tl.trans(v), input_precision="ieee")
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision="ieee")
    return dq


@triton.jit
def _dq_kernel(Q, K, V, DO, Lse, Delta, DQ, NegSlopes, n_head, tq, tk, scale, c,
               CAUSAL: tl.constexpr, ALIBI: tl.constexpr, D: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    m0 = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    offset = tk - tq
    rows = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q + bh * tq * D, rows, tq, offs_d, D, 0.0)
    do = _load_rows(DO + bh * tq * D, rows, tq, offs_d, D, 0.0)
    lse = tl.load(Lse + bh * tq + rows, mask=rows < tq, other=0.0)
    delta = tl.load(Delta + bh * tq + rows, mask=rows < tq, other=0.0)
    k_base, v_base = K + bh * tk * D, V + bh * tk * D
    neg_slope = tl.load(NegSlopes + bh % n_head)
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    lo, hi = _key_phases(m0, tq, tk, CAUSAL, BLOCK_M, BLOCK_N)
    dq = _dq_tiles(dq, q, do, lse, delta, k_base, v_base, rows, offs_n, offs_d, 0, lo, tk, offset,
                   c, neg_slope, CAUSAL, ALIBI, False, D, BLOCK_N)
    dq = _dq_tiles(dq, q, do, lse, delta, k_base, v_base, rows, offs_n, offs_d, lo, hi, tk, offset,
                   c, neg_slope, CAUSAL, ALIBI, True, D, BLOCK_N)
    _store_rows(DQ + bh * tq * D, rows, tq, offs_d, D, dq * scale)


@triton.jit
def _dkdv_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, cols, offs_m, offs_d, start,
                stop, tq, tk, offset, c, neg_slope, CAUSAL: tl.constexpr, ALIBI: tl.constexpr,
                MASKED: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr):
    for m0 in range(start, stop, BLOCK_M):
        rows = m0 + offs_m
        q = _load_rows(q_base, rows, tq, offs_d, D, 0.0)
        do = _load_rows(do_base, rows, tq, offs_d, D, 0.0)
        # Rows past the end get lse = +inf, so their probabilities are 0.
        lse = tl.load(lse_base + rows, mask=rows < tq, other=float("inf"))
        delta = tl.load(delta_base + rows, mask=rows < tq, other=0.0)
        # Transposed tiles (keys x queries), so dK and dV accumulate without transposing them.
        s_t = _biased(tl.dot(k, tl.trans(q), input_precision="ieee") * c - lse[None, :],
                      rows[None, :], cols[:, None], tk, offset, neg_slope, CAUSAL, ALIBI, MASKED)
        p_t = tl.exp2(s_t)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision="ieee")
        dp_t = tl.dot(v, tl.trans(do), input_precision="ieee")
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision="ieee")
    return dk, dv


@triton.jit
def _dkdv_kernel(Q, K, V, DO, Lse, Delta, DK, DV, NegSlopes, n_head, tq, tk, scale, c,
                 CAUSAL: tl.constexpr, ALIBI: tl.constexpr, D: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    n0 = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1)
    offset = tk - tq
    cols = n0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_rows(K + bh * tk * D, cols, tk, offs_d, D, 0.0)
    v = _load_rows(V + bh * tk * D, cols, tk, offs_d, D, 0.0)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    neg_slope = tl.load(NegSlopes + bh % n_head)
    if CAUSAL:
        # Rows before lo see none of these keys; rows from mid on see all of them.
        lo = tl.maximum(n0 - offset, 0)
        masked_rows = tl.maximum(n0 + BLOCK_N - 1 - offset - lo, 0)
        mid = lo + tl.cdiv(masked_rows, BLOCK_M) * BLOCK_M
    else:
        lo = 0
        mid = 0
    q_base, do_base = Q + bh * tq * D, DO + bh * tq * D
    lse_base, delta_base = Lse + bh * tq, Delta + bh * tq
    dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, cols, offs_m, offs_d,
                         lo, mid, tq, tk, offset, c, neg_slope, CAUSAL, ALIBI, True, D, BLOCK_M)
    dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, cols, offs_m, offs_d,
                         mid, tq, tq, tk, offset, c, neg_slope, CAUSAL, ALIBI, False, D,
                         BLOCK_M)
    _store_rows(DK + bh * tk * D, cols, tk, offs_d, D, dk * scale)
    _store_rows(DV + bh * tk * D, cols, tk, offs_d, D, dv)


def attend(q, k, v, *, causal, scale, dropout_p=0.0, alibi_slopes=None, block_q=None,
           block_k=None):
    if dropout_p:
        raise ValueError("the triton attention backend does not support attention dropout")
    return TritonAttention.apply(q, k, v, causal, scale, alibi_slopes, block_q or BLOCKS[0],
                                 block_k or BLOCKS[1])


def _flat(x):
    return x.reshape(-1, x.size(-2), x.size(-1)).contiguous()


class TritonAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale, slopes, block_q, block_k):
        qf, kf, vf = _flat(q), _flat(k), _flat(v)
        alibi = slopes is not None
        # In base 2 like the scores; without ALiBi one unread zero stands in.
        neg_slopes = (-LOG2E * slopes.float() if alibi
                      else torch.zeros(1, device=q.device)).contiguous()
        n, tq, d = qf.shape
        tk = kf.size(1)
        out = torch.empty_like(qf)
        lse = torch.empty(n, tq, device=q.device, dtype=torch.float32)
        block_d = max(16, triton.next_power_of_2(d))  # tl.dot needs every side >= 16
        _fwd_kernel[(triton.cdiv(tq, block_q), n)](
            qf, kf, vf, out, lse, neg_slopes, neg_slopes.numel(), tq, tk, scale * LOG2E,
            CAUSAL=causal, ALIBI=alibi, D=d, BLOCK_M=block_q, BLOCK_N=block_k, BLOCK_D=block_d)
        ctx.save_for_backward(qf, kf, vf, out, lse, neg_slopes)
        ctx.args = (causal, alibi, scale, block_q, block_k, block_d)
        return out.view(q.shape)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, neg_slopes = ctx.saved_tensors
        causal, alibi, scale, block_q, block_k, block_d = ctx.args
        do = _flat(grad_out)
        n, tq, d = q.shape
        tk = k.size(1)
        delta = (do.float() * out.float()).sum(dim=-1)  # rowsum(dO ∘ O), (N, Tq)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        common = dict(CAUSAL=causal, ALIBI=alibi, D=d, BLOCK_M=block_q, BLOCK_N=block_k,
                      BLOCK_D=block_d)
        heads = (neg_slopes, neg_slopes.numel())
        _dq_kernel[(triton.cdiv(tq, block_q), n)](
            q, k, v, do, lse, delta, dq, *heads, tq, tk, scale, scale * LOG2E, **common)
        _dkdv_kernel[(triton.cdiv(tk, block_k), n)](
            q, k, v, do, lse, delta, dk, dv, *heads, tq, tk, scale, scale * LOG2E, **common)
        shape = grad_out.shape[:2]
        return (dq.view(*shape, tq, d), dk.view(*shape, tk, d), dv.view(*shape, tk, d),
                None, None, None, None, None)
