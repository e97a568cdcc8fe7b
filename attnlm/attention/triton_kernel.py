"""The tiled algorithm (see tiled.py) as Triton kernels for CUDA: FlashAttention-2's forward and
backward, one program per block of rows. Needs the optional `triton` package.

Each program keeps its tiles in registers: the forward holds a block of queries and walks the key
blocks; the backward's dK/dV kernel holds a block of keys and walks the query blocks, and its dQ
kernel holds a block of queries and walks the key blocks, so no two programs write the same
gradient of q, k or v (no atomics there: the result is deterministic). Key blocks are walked in
phases: those every row of the block sees whole need no mask; those that cross the causal
diagonal, the end of the keys or a sliding window's lower edge are masked; those wholly outside
the window are never visited, so the work grows as T x window, not T². Scores are in base 2, as in
tiled.py. Operands keep the input dtype (tensor cores for 16-bit inputs); products and statistics
accumulate in float32.

Grouped-query attention: query head h reads key/value head h // group through its pointers (k and
v are never repeated), and the dK/dV program of a key/value head walks the query blocks of its
group's heads one after another, adding up their contributions in a fixed order.

Options computed inside every tile, each a compile-time switch (without it the kernels are
unchanged): the soft cap, cap·tanh(score/cap), with its derivative 1 - tanh² in the backward;
ALiBi's bias -slope·(query position - key position), from the row and column indices; and the
learned relative bias, read from a (heads, Tk) table of the bias per distance that the caller
gathers from the bucket table (torch's indexing then takes the gradient back to the buckets). That
per-distance gradient, the sum of dS over the entries at each distance, is added up with float32
atomics by the dQ kernel: the one result whose order of summation is not fixed.

On the CPU, TRITON_INTERPRET=1 runs these kernels in NumPy (slowly): that is how the tests check
them on a machine without a GPU.
"""

import contextlib
import math

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from attnlm.errors import AttnlmError, InputError

LOG2E = math.log2(math.e)
# Integer arguments Triton would otherwise compile a kernel for per class of value (1, a multiple
# of 16, any other): a decode step (tq = 1) and lengths that move between classes would each cost
# another compile (26 s at D = 64, 73 s at 128 for float32's former tiles, on a CPU).
PLAIN_INTS = ["n_head", "group", "tq", "tk", "window"]
# One grid dimension holds batch x heads; CUDA allows this many blocks along it.
MAX_GRID_Y = 65535


def default_blocks(dtype, head_dim):
    """(query block, key block) on CUDA, chosen so that every kernel fits in a Hopper GPU's
    shared memory (232,448 bytes a block) and spills little; not yet timed on a GPU. Compiled
    for sm_90a on a CPU (Triton 3.6, figures from ptxas), with every option on: 185 KB at most
    (bfloat16, D = 256), spills up to 6 KB a thread (float32, D = 128, the dK/dV kernel), where
    float32 in 64 x 64 tiles (its products are plain FMA code at ieee precision) spilled up to
    174 KB and outgrew shared memory with the relative bias. D above 128 halves the key block.
    Compiling the three kernels took 5 s (D = 64) and 14 s (D = 128) in float32, 2 to 4 s in
    bfloat16, there (one thread of an AMD EPYC)."""
    if dtype == torch.float32:
        return 32, 32
    return (64, 64) if head_dim <= 128 else (64, 32)


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
def _tanh(x):
    # Not every Triton version has a tanh; this identity is exact to float32 rounding.
    return 2 * tl.sigmoid(2 * x) - 1


@triton.jit
def _visible(rows, cols, tk, offset, window, CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """Which (row, column) pairs are real keys that the query may see; rows and cols come
    broadcastable, as (M, 1) and (1, N) or transposed."""
    visible = cols < tk
    if CAUSAL:
        visible &= cols <= offset + rows
    if WINDOW:
        visible &= offset + rows - cols < window
    return visible


@triton.jit
def _distance(rows, cols, tk, offset, CAUSAL: tl.constexpr):
    """Query position minus key position (its absolute value without CAUSAL), clamped into
    0 .. tk-1, the range of every visible pair: the entries clamped are masked or padding."""
    distance = offset + rows - cols
    if CAUSAL:
        distance = tl.maximum(distance, 0)
    else:
        distance = tl.abs(distance)
    return tl.minimum(distance, tk - 1)


@triton.jit
def _scores(qk, rows, cols, tk, offset, c, cap2, window, neg_slope, rel, CAUSAL: tl.constexpr,
            WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
            RELATIVE: tl.constexpr, MASKED: tl.constexpr):
    """A tile of base-2 scores from a tile qk of products q·k (rows and cols broadcastable as for
    _visible): qk·c, or with SOFTCAP cap2·tanh(qk·c) (then c = scale/cap, cap2 = cap·log2 e);
    ALiBi's and the relative bias added; -inf where the query may not look. Also returns the
    tanh, which the backward needs (qk itself without SOFTCAP)."""
    if SOFTCAP:
        t = _tanh(qk * c)
        s = t * cap2
    else:
        t = qk
        s = qk * c
    if ALIBI or RELATIVE:
        distance = _distance(rows, cols, tk, offset, CAUSAL)
        if ALIBI:
            s += neg_slope * distance.to(tl.float32)
        if RELATIVE:
            s += tl.load(rel + distance)
    if MASKED:
        s = tl.where(_visible(rows, cols, tk, offset, window, CAUSAL, WINDOW), s, float("-inf"))
    return s, t


@triton.jit
def _key_phases(m0, tq, tk, window, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """For the query rows from m0: the key blocks in [start, full) and [lo, hi) need a mask,
    those in [full, lo) do not; those before start lie wholly outside the window."""
    offset = tk - tq
    if CAUSAL:
        lo = (offset + m0 + 1) // BLOCK_N * BLOCK_N  # keys up to offset + m0 are seen by every row
        hi = tl.minimum(tk, offset + m0 + BLOCK_M)
    else:
        lo = tk // BLOCK_N * BLOCK_N
        hi = tk
    start = 0
    full = 0
    if WINDOW:
        # The first row sees keys from offset + m0 - window + 1, the last from
        # offset + m0 + BLOCK_M - window.
        start = tl.maximum(offset + m0 - window + 1, 0) // BLOCK_N * BLOCK_N
        full = tl.cdiv(tl.maximum(offset + m0 + BLOCK_M - window, 0), BLOCK_N) * BLOCK_N
        full = tl.minimum(full, lo)
    return start, full, lo, hi


@triton.jit
def _query_phases(n0, tq, tk, window, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """For the keys from n0: the query rows in [lo, mid) and [full, hi) need a mask, those in
    [mid, full) do not (each span a whole number of blocks but the last); the rows before lo and
    from hi on see none of these keys."""
    offset = tk - tq
    if CAUSAL:
        lo = tl.maximum(n0 - offset, 0)
        masked_rows = tl.maximum(n0 + BLOCK_N - 1 - offset - lo, 0)
        mid = lo + tl.cdiv(masked_rows, BLOCK_M) * BLOCK_M
    else:
        lo = 0
        mid = 0
    full = tq
    hi = tq
    if WINDOW:
        # Rows before n0 + window - offset see every key of the block; those from
        # n0 + BLOCK_N - 1 + window - offset on see none.
        hi = tl.minimum(n0 + BLOCK_N - 1 + window - offset, tq)
        whole = tl.maximum(tl.minimum(n0 + window - offset, hi) - mid, 0)
        full = mid + whole // BLOCK_M * BLOCK_M
    return lo, mid, full, hi


@triton.jit
def _fwd_tiles(acc, m_i, l_i, q, k_base, v_base, rows, offs_n, offs_d, start, stop, tk, offset, c,
               cap2, window, neg_slope, rel, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
               SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, RELATIVE: tl.constexpr,
               MASKED: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr):
    for n0 in range(start, stop, BLOCK_N):
        cols = n0 + offs_n
        k = _load_rows(k_base, cols, tk, offs_d, D, 0.0)
        v = _load_rows(v_base, cols, tk, offs_d, D, 0.0)
        s, _ = _scores(tl.dot(q, tl.trans(k), input_precision="ieee"), rows[:, None],
                       cols[None, :], tk, offset, c, cap2, window, neg_slope, rel, CAUSAL, WINDOW,
                       SOFTCAP, ALIBI, RELATIVE, MASKED)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = m_new
        if MASKED:
            # A row may see none of a masked tile's keys (below a window's edge) and none before
            # it: its maximum is still -inf, and 0 stands in so that no -inf - -inf makes a NaN.
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        correction = tl.exp2(m_i - m_ref)
        p = tl.exp2(s - m_ref[:, None])
        l_i = l_i * correction + tl.sum(p, 1)
        acc = acc * correction[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new
    return acc, m_i, l_i


@triton.jit(do_not_specialize=PLAIN_INTS)
def _fwd_kernel(Q, K, V, Out, Lse, NegSlopes, Rel, n_head, group, tq, tk, c, cap2, window,
                CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
                ALIBI: tl.constexpr, RELATIVE: tl.constexpr, D: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    m0 = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)  # offsets past 2^31 elements
    kv = bh // group  # (batch·n_head + head) // group = batch·n_kv_head + head // group
    offset = tk - tq
    rows = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q + bh * tq * D, rows, tq, offs_d, D, 0.0)
    k_base, v_base = K + kv * tk * D, V + kv * tk * D
    neg_slope = tl.load(NegSlopes + bh % n_head)
    rel = Rel + bh % n_head * tk
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    start, full, lo, hi = _key_phases(m0, tq, tk, window, CAUSAL, WINDOW, BLOCK_M, BLOCK_N)
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, k_base, v_base, rows, offs_n, offs_d, start, full,
                               tk, offset, c, cap2, window, neg_slope, rel, CAUSAL, WINDOW,
                               SOFTCAP, ALIBI, RELATIVE, True, D, BLOCK_N)
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, k_base, v_base, rows, offs_n, offs_d, full, lo,
                               tk, offset, c, cap2, window, neg_slope, rel, CAUSAL, WINDOW,
                               SOFTCAP, ALIBI, RELATIVE, False, D, BLOCK_N)
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, k_base, v_base, rows, offs_n, offs_d, lo, hi, tk,
                               offset, c, cap2, window, neg_slope, rel, CAUSAL, WINDOW, SOFTCAP,
                               ALIBI, RELATIVE, True, D, BLOCK_N)
    if WINDOW:
        l_i = tl.where(l_i == 0, 1.0, l_i)  # a padding row past the end may see no key at all
    _store_rows(Out + bh * tq * D, rows, tq, offs_d, D, acc / l_i[:, None])
    tl.store(Lse + bh * tq + rows, m_i + tl.log2(l_i), mask=rows < tq)


@triton.jit
def _dq_tiles(dq, q, do, lse, delta, k_base, v_base, drel, rows, offs_n, offs_d, start, stop, tk,
              offset, c, cap2, window, neg_slope, rel, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
              SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, RELATIVE: tl.constexpr,
              MASKED: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr):
    for n0 in range(start, stop, BLOCK_N):
        cols = n0 + offs_n
        k = _load_rows(k_base, cols, tk, offs_d, D, 0.0)
        v = _load_rows(v_base, cols, tk, offs_d, D, 0.0)
        s, t = _scores(tl.dot(q, tl.trans(k), input_precision="ieee"), rows[:, None],
                       cols[None, :], tk, offset, c, cap2, window, neg_slope, rel, CAUSAL, WINDOW,
                       SOFTCAP, ALIBI, RELATIVE, MASKED)
        p = tl.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision="ieee")
        ds = p * (dp - delta[:, None])  # the gradient of the scores, cap and biases included
        if RELATIVE:
            # ds is 0 on every pair a query may not see and on padding, whose distances are clamped.
            tl.atomic_add(drel + _distance(rows[:, None], cols[None, :], tk, offset, CAUSAL), ds)
        if SOFTCAP:
            ds *= 1 - t * t
        dq += tl.dot(ds.to(k.dtype), k, input_precision="ieee")
    return dq


@triton.jit(do_not_specialize=PLAIN_INTS)
def _dq_kernel(Q, K, V, DO, Lse, Delta, DQ, DRel, NegSlopes, Rel, n_head, group, tq, tk, scale, c,
               cap2, window, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
               ALIBI: tl.constexpr, RELATIVE: tl.constexpr, D: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    m0 = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)  # offsets past 2^31 elements
    kv = bh // group
    offset = tk - tq
    rows = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q + bh * tq * D, rows, tq, offs_d, D, 0.0)
    do = _load_rows(DO + bh * tq * D, rows, tq, offs_d, D, 0.0)
    lse = tl.load(Lse + bh * tq + rows, mask=rows < tq, other=0.0)
    delta = tl.load(Delta + bh * tq + rows, mask=rows < tq, other=0.0)
    k_base, v_base = K + kv * tk * D, V + kv * tk * D
    neg_slope = tl.load(NegSlopes + bh % n_head)
    rel = Rel + bh % n_head * tk
    drel = DRel + bh * tk
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    start, full, lo, hi = _key_phases(m0, tq, tk, window, CAUSAL, WINDOW, BLOCK_M, BLOCK_N)
    dq = _dq_tiles(dq, q, do, lse, delta, k_base, v_base, drel, rows, offs_n, offs_d, start, full,
                   tk, offset, c, cap2, window, neg_slope, rel, CAUSAL, WINDOW, SOFTCAP, ALIBI,
                   RELATIVE, True, D, BLOCK_N)
    dq = _dq_tiles(dq, q, do, lse, delta, k_base, v_base, drel, rows, offs_n, offs_d, full, lo, tk,
                   offset, c, cap2, window, neg_slope, rel, CAUSAL, WINDOW, SOFTCAP, ALIBI,
                   RELATIVE, False, D, BLOCK_N)
    dq = _dq_tiles(dq, q, do, lse, delta, k_base, v_base, drel, rows, offs_n, offs_d, lo, hi, tk,
                   offset, c, cap2, window, neg_slope, rel, CAUSAL, WINDOW, SOFTCAP, ALIBI,
                   RELATIVE, True, D, BLOCK_N)
    _store_rows(DQ + bh * tq * D, rows, tq, offs_d, D, dq * scale)


@triton.jit
def _dkdv_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, cols, offs_m, offs_d, start,
                stop, tq, tk, offset, c, cap2, window, neg_slope, rel, CAUSAL: tl.constexpr,
                WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
                RELATIVE: tl.constexpr, MASKED: tl.constexpr, D: tl.constexpr,
                BLOCK_M: tl.constexpr):
    for m0 in range(start, stop, BLOCK_M):
        rows = m0 + offs_m
        q = _load_rows(q_base, rows, tq, offs_d, D, 0.0)
        do = _load_rows(do_base, rows, tq, offs_d, D, 0.0)
        # Rows past the end get lse = +inf, so their probabilities are 0.
        lse = tl.load(lse_base + rows, mask=rows < tq, other=float("inf"))
        delta = tl.load(delta_base + rows, mask=rows < tq, other=0.0)
        # Transposed tiles (keys x queries), so dK and dV accumulate without transposing them.
        s_t, t_t = _scores(tl.dot(k, tl.trans(q), input_precision="ieee"), rows[None, :],
                           cols[:, None], tk, offset, c, cap2, window, neg_slope, rel, CAUSAL,
                           WINDOW, SOFTCAP, ALIBI, RELATIVE, MASKED)
        p_t = tl.exp2(s_t - lse[None, :])
        dv += tl.dot(p_t.to(do.dtype), do, input_precision="ieee")
        dp_t = tl.dot(v, tl.trans(do), input_precision="ieee")
        ds_t = p_t * (dp_t - delta[None, :])
        if SOFTCAP:
            ds_t *= 1 - t_t * t_t
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision="ieee")
    return dk, dv


@triton.jit(do_not_specialize=PLAIN_INTS)
def _dkdv_kernel(Q, K, V, DO, Lse, Delta, DK, DV, NegSlopes, Rel, n_head, group, tq, tk, scale,
                 c, cap2, window, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
                 SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, RELATIVE: tl.constexpr,
                 D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    n0 = tl.program_id(0) * BLOCK_N
    kv = tl.program_id(1).to(tl.int64)  # offsets past 2^31 elements
    offset = tk - tq
    cols = n0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_rows(K + kv * tk * D, cols, tk, offs_d, D, 0.0)
    v = _load_rows(V + kv * tk * D, cols, tk, offs_d, D, 0.0)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    lo, mid, full, hi = _query_phases(n0, tq, tk, window, CAUSAL, WINDOW, BLOCK_M, BLOCK_N)
    # The query heads that read this key/value head, batch·n_head + head for head in
    # kv_head·group .. kv_head·group + group - 1: kv·group on, in the flattened rows.
    for bh in range(kv * group, kv * group + group):
        neg_slope = tl.load(NegSlopes + bh % n_head)
        rel = Rel + bh % n_head * tk
        q_base, do_base = Q + bh * tq * D, DO + bh * tq * D
        lse_base, delta_base = Lse + bh * tq, Delta + bh * tq
        dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, cols, offs_m,
                             offs_d, lo, mid, tq, tk, offset, c, cap2, window, neg_slope, rel,
                             CAUSAL, WINDOW, SOFTCAP, ALIBI, RELATIVE, True, D, BLOCK_M)
        dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, cols, offs_m,
                             offs_d, mid, full, tq, tk, offset, c, cap2, window, neg_slope, rel,
                             CAUSAL, WINDOW, SOFTCAP, ALIBI, RELATIVE, False, D, BLOCK_M)
        dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, cols, offs_m,
                             offs_d, full, hi, tq, tk, offset, c, cap2, window, neg_slope, rel,
                             CAUSAL, WINDOW, SOFTCAP, ALIBI, RELATIVE, True, D, BLOCK_M)
    _store_rows(DK + kv * tk * D, cols, tk, offs_d, D, dk * scale)
    _store_rows(DV + kv * tk * D, cols, tk, offs_d, D, dv)


def attend(q, k, v, *, causal, scale, dropout_p=0.0, alibi_slopes=None, window=0, softcap=0.0,
           relative=None, additive=None, block_q=None, block_k=None):
    if dropout_p:
        raise ValueError("the triton attention backend does not support attention dropout")
    if additive is not None:
        raise ValueError("the triton attention backend scores by dot product only; additive "
                         "scores need the naive backend")
    if window and not causal:
        raise ValueError("a sliding window needs causal attention")
    rel = None
    if relative is not None:
        table, buckets = relative
        # The bias per head and distance 0 .. Tk-1; indexing takes its gradient back to the table.
        rel = table[:, buckets[: k.size(-2)]]
    if q.size(0) * q.size(1) > MAX_GRID_Y:
        raise InputError(f"the triton attention backend takes at most {MAX_GRID_Y:,} sequences x "
                          f"heads in one call, not {q.size(0) * q.size(1):,}; use a smaller "
                          f"batch, or model.attention=tiled or sdpa")
    forward_q, forward_k = default_blocks(q.dtype, q.size(-1))
    # One dtype for the three (a kernel's products take operands of one type).
    k, v = k.to(q.dtype), v.to(q.dtype)
    return TritonAttention.apply(q, k, v, rel, causal, scale, alibi_slopes, window, softcap,
                                 block_q or forward_q, block_k or forward_k)


def _launch(kernel, grid, *args, **flags):
    """Run a kernel on its tensors' GPU (Triton launches on the current device), with a clear
    error where its tiles need more shared memory than this GPU has."""
    device = args[0].device
    try:
        # (on the CPU, under TRITON_INTERPRET=1, there is no device to choose)
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            kernel[grid](*args, **flags)
    except OutOfResources as e:
        raise AttnlmError(f"the triton attention kernels for head dim {flags['D']} in "
                          f"{args[0].dtype} do not fit this GPU ({e}); use model.attention=tiled "
                          f"or sdpa") from e


def _flat(x):
    return x.reshape(-1, x.size(-2), x.size(-1)).contiguous()


class TritonAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, rel, causal, scale, slopes, window, softcap, block_q, block_k):
        batch, n_head, tq, d = q.shape
        qf, kf, vf = _flat(q), _flat(k), _flat(v)
        tk = kf.size(1)
        # In base 2 like the scores; without ALiBi or a relative bias, unread zeros stand in.
        neg_slopes = (-LOG2E * slopes.float() if slopes is not None
                      else torch.zeros(n_head, device=q.device)).contiguous()
        rel2 = (LOG2E * rel.float() if rel is not None
                else torch.zeros(1, device=q.device)).contiguous()
        # Soft-capped, a score is cap·tanh(q·k·scale/cap): c scales q·k, cap2 the tanh.
        c, cap2 = (scale / softcap, softcap * LOG2E) if softcap else (scale * LOG2E, 1.0)
        out = torch.empty_like(qf)
        lse = torch.empty(qf.size(0), tq, device=q.device, dtype=torch.float32)
        flags = dict(CAUSAL=causal, WINDOW=window > 0, SOFTCAP=softcap > 0,
                     ALIBI=slopes is not None, RELATIVE=rel is not None, D=d, BLOCK_M=block_q,
                     BLOCK_N=block_k, BLOCK_D=max(16, triton.next_power_of_2(d)))  # tl.dot: >= 16
        heads = (neg_slopes, rel2, n_head, n_head // k.size(1), tq, tk)
        _launch(_fwd_kernel, (triton.cdiv(tq, block_q), qf.size(0)),
                qf, kf, vf, out, lse, *heads, c, cap2, window, **flags)
        ctx.save_for_backward(qf, kf, vf, out, lse, neg_slopes, rel2)
        ctx.args = (q.shape, k.shape, scale, c, cap2, window, flags)
        return out.view(q.shape)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, neg_slopes, rel2 = ctx.saved_tensors
        q_shape, k_shape, scale, c, cap2, window, flags = ctx.args
        batch, n_head, tq, _ = q_shape
        tk = k.size(1)
        do = _flat(grad_out)
        delta = (do.float() * out.float()).sum(dim=-1)  # rowsum(dO ∘ O), (N, Tq)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        # The relative bias's gradient per query row of heads and distance, summed over the batch.
        relative = flags["RELATIVE"]
        drel = torch.zeros(q.size(0), tk if relative else 1, device=q.device, dtype=torch.float32)
        heads = (neg_slopes, rel2, n_head, n_head // k_shape[1], tq, tk)
        _launch(_dq_kernel, (triton.cdiv(tq, flags["BLOCK_M"]), q.size(0)),
                q, k, v, do, lse, delta, dq, drel, *heads, scale, c, cap2, window, **flags)
        _launch(_dkdv_kernel, (triton.cdiv(tk, flags["BLOCK_N"]), k.size(0)),
                q, k, v, do, lse, delta, dk, dv, *heads, scale, c, cap2, window, **flags)
        drel = drel.view(batch, n_head, tk).sum(0) if relative else None
        return (dq.view(q_shape), dk.view(k_shape), dv.view(k_shape), drel, None, None, None,
                None, None, None, None)
