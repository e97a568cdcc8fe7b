"""FlashAttention-2 in PyTorch operations: attention in tiles, with memory linear in T.

Queries are taken a block at a time against blocks of keys and values. An online softmax keeps,
for each query row, the running maximum m and sum l of exp(score - m); when a later key block
raises the maximum, the sum and the output accumulator are rescaled. Key blocks are taken from
the diagonal leftwards, so the nearest keys set the maximum first, and every later block is
exponentiated against the maximum so far without looking for its own (lazy rescaling: passes
over the tile fewer); only a query block in which some scores rose far above it is redone the
full way. Key blocks that no query of the block may see (right of the causal diagonal, or left
of every row's sliding window) are never computed, so a window of W costs T·W, not T²; the mask
is applied only to the tiles that cross an edge. The forward saves only the output and each
row's final m and l; the backward recomputes every tile's probabilities from them
(FlashAttention-2, Dao 2023, algorithm 2, with 1/l taken into dO and its row sums):

    P = exp(S - m) / l   dV += Pᵀ dO   dP = dO Vᵀ   dS = P ∘ (dP - rowsum(dO ∘ O))
    dQ += dS K · scale   dK += dSᵀ Q · scale

Grouped-query attention: the G query heads that share a key/value head are laid out as the rows
of one (B·Hk, Tq·G, D) tensor, position-major (row r is position r // G of head group r % G), so
that a query block is a plain slice and every key/value tile is read once for all G heads; keys
and values are never repeated. Masks and biases are (rows, 1, cols) or (Hk, rows, G, cols)
tensors broadcast over that layout.

Soft-capping, cap·tanh(s/cap), is applied to each tile before the biases; the backward multiplies
dS by its derivative 1 - tanh² on the way to dQ and dK. ALiBi's bias, -slope·(query position -
key position), and the learned relative bias, table[:, bucket(distance)], are added to each tile
from a (block_q, block_k) template of row-minus-column offsets made once per call: no Tq x Tk
tensor is ever built. The relative table's gradient is dS summed by bucket (over the batch and the
tile) into an (H, buckets) tensor.

On the CPU the matmuls run near the machine's peak; what else costs time is the number of
passes over each tile and Python's overhead per operation. So every step is one batched matmul
over all B·Hk heads into preallocated buffers, the elementwise steps run in place, and the
subtractions are done by the matmuls themselves: the query block carries -m in an extra column
and the keys a row of ones under them, so that Q·Kᵀ comes out as scores minus the running
maximum (a (D+1)-long product costs no more than a D-long one); the backward likewise takes m
and rowsum(dO ∘ O) off inside its two score-sized products. Scores are kept in base 2 (the scale
is multiplied by log2(e)): torch's exp2 is as fast as exp on an Intel Xeon and about three times
faster on an AMD EPYC.

bfloat16 inputs are multiplied in bfloat16, forward and backward (each product accumulating in
float32 inside the matmul, on the CPU's bfloat16 matrix units where it has them), so scores,
probabilities and dS are bfloat16, as they are in naive under autocast; the softmax's statistics,
the output and the gradients are summed in float32. Any other dtype is computed in float32
throughout.

In bfloat16 tiled's forward is still slower than torch's own CPU attention (1.7 to 2.3x its
time on one thread of an Intel Xeon with AMX, T = 2048 to 8192): that kernel does the softmax of
a tile in one fused pass with a fast approximate exp while it is in cache, where torch's
operations need one pass per step, and the exp alone over a bfloat16 tile (exp2_, 2 elements per
ns) takes about as long as both of the tile's matmuls together. Forward+backward, where the
matmuls weigh more, it took 0.93 to 1.2x the time.
"""

import bisect
import copy
import dataclasses
import functools
import math

import torch

from attnlm.attention.masks import alibi_bias, relative_bias

LOG2E = math.log2(math.e)
# A row's running maximum before its first tile: finite, so that no -inf - (-inf) makes a NaN.
MIN = torch.finfo(torch.float32).min
# The largest sum of exp2(score - running maximum) a row may reach under lazy rescaling and still
# be kept (see forward): far from float32's overflow, whatever the values.
LAZY_LIMIT = 2.0**32

# (query block, key block) per device type. CPU: measured with benchmarks/attention.py --backends
# sdpa,tiled@QxK (B=1, D=64, float32, one thread of an Intel Xeon with AMX), forward: 128x256
# was the best or within 3% of the best of 64 to 512 (square and mixed) at T = 2048, 4096 and
# 8192 with 8 heads and at T = 2048 with 2 and 32, and within 2% of 256x256 forward+backward;
# 256x256 took up to 10% longer forward (an AMD EPYC preferred it to 128x128 with an earlier
# version of the forward), 512 rows outgrow the cache (1.3 to 1.6x sdpa's time), 64 rows pay
# Python's overhead per tile. bfloat16 (its tiles half the bytes, and Python's overhead a larger
# share of a faster product): 256x256, 2.0 to 2.1x sdpa's forward time at T = 2048 and 4096,
# against 2.4 to 2.5x with 128x256 and 2.1 to 2.5x with 256x512; with the later forward
# (contiguous key blocks, no float32 mask) 512x512 took 0.88 to 1.13x 256x256's time (longer at
# T = 2048, shorter at 8192), no clear winner. CUDA: a guess, not yet measured.
DEFAULT_BLOCKS = {"cpu": {torch.float32: (128, 256), torch.bfloat16: (256, 256)},
                  "cuda": {torch.float32: (128, 128)}}
# The backward's blocks where they differ from the forward's. The backward makes five products
# of each tile against the forward's two, and one exponential like it, so it is ruled by its
# matmuls, which bfloat16's matrix units run faster on larger tiles (with fewer products to
# convert and sum into float32 per score). CPU, bfloat16, measured as above: 512x512 took 3%
# less time than 256x256 at T = 2048 and 18% less at 4096 and 8192 (the backward's share of
# forward+backward).
BACKWARD_BLOCKS = {"cpu": {torch.bfloat16: (512, 512)}}


def default_blocks(device_type, dtype, backward=False):
    """(query block, key block) for matmuls in dtype on a device type (float32's if unknown),
    in the forward or the backward."""
    if backward and dtype in BACKWARD_BLOCKS.get(device_type, {}):
        return BACKWARD_BLOCKS[device_type][dtype]
    blocks = DEFAULT_BLOCKS.get(device_type, DEFAULT_BLOCKS["cpu"])
    return blocks.get(dtype, blocks[torch.float32])


def attend(q, k, v, *, causal, scale, dropout_p=0.0, alibi_slopes=None, window=0, softcap=0.0,
           relative=None, additive=None, block_q=None, block_k=None):
    if dropout_p:
        raise ValueError("the tiled attention backend does not support attention dropout")
    if additive is not None:
        raise ValueError("the tiled attention backend scores by dot product only; additive "
                         "scores need the naive backend")
    if window and not causal:
        raise ValueError("a sliding window needs causal attention")
    if q.size(-2) == 1:
        return _one_query(q, k, v, causal=causal, scale=scale, alibi_slopes=alibi_slopes,
                          window=window, softcap=softcap, relative=relative)
    device, dtype = q.device.type, matmul_dtype(q.dtype)
    forward_q, forward_k = default_blocks(device, dtype)
    backward_q, backward_k = default_blocks(device, dtype, backward=True)
    spec = Spec(causal, scale, window, softcap, block_q or forward_q, block_k or forward_k,
                (block_q or backward_q, block_k or backward_k))
    table, buckets = relative if relative is not None else (None, None)
    return TiledAttention.apply(q, k, v, alibi_slopes, table, buckets, spec)


def _one_query(q, k, v, *, causal, scale, alibi_slopes, window, softcap, relative):
    """One query per head, as in each cached decoding step: its scores are a single row, already
    linear in T, and tiling it would only add passes over the keys. The query sits at the last
    position, so it sees every key (none but its window's is read); the G query heads sharing a
    key/value head are taken as G rows against it, so keys and values are not repeated."""
    b, h, _, d = q.shape
    hk, tk = k.size(1), k.size(2)
    first = max(0, tk - window) if window else 0
    s = (q.view(b, hk, h // hk, d) @ k[:, :, first:].transpose(-2, -1)) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if alibi_slopes is not None:
        s = s + alibi_bias(alibi_slopes, 1, tk, causal)[..., first:].view(hk, h // hk, -1).to(s.dtype)
    if relative is not None:
        s = s + relative_bias(relative, 1, tk, causal)[..., first:].view(hk, h // hk, -1).to(s.dtype)
    return (torch.softmax(s, dim=-1) @ v[:, :, first:]).view(b, h, 1, d)


@dataclasses.dataclass(frozen=True)
class Spec:
    """The options of one call that shape its tiles: the blocks of the pass at hand, and the
    backward's."""
    causal: bool
    scale: float
    window: int
    softcap: float
    block_q: int
    block_k: int
    backward_blocks: tuple


def _flat(x, dtype=torch.float32):
    """(B, H, T, D) -> contiguous (B·H, T, D) in dtype, copied only if needed."""
    return x.reshape(-1, x.size(-2), x.size(-1)).to(dtype).contiguous()


def _rows(x, kv_heads, dtype=torch.float32):
    """(B, H, T, D) queries (or their gradient) -> (B·Hk, T·G, D) in dtype: the G = H/Hk query
    heads of each key/value head as rows, position-major. A view when G = 1."""
    b, h, t, d = x.shape
    group = h // kv_heads
    x = x.reshape(b, kv_heads, group, t, d).transpose(2, 3)
    return x.reshape(b * kv_heads, t * group, d).to(dtype).contiguous()


def _unrows(x, batch, heads):
    """The inverse of _rows: (B·Hk, T·G, D) -> (B, H, T, D)."""
    n, rows, d = x.shape
    kv_heads = n // batch
    group = heads // kv_heads
    x = x.view(batch, kv_heads, rows // group, group, d).transpose(2, 3)
    return x.reshape(batch, heads, rows // group, d)


def _ones_below(x, rows=1):
    """(N, T, D) -> (N, D+rows, T): x transposed, with rows of ones under it."""
    n, t, d = x.shape
    out = torch.empty(n, d + rows, t, device=x.device, dtype=x.dtype)
    out[:, :d] = x.transpose(1, 2)
    out[:, d:] = 1
    return out


def _beside(x, scale, columns):
    """(N, T, D) and a list of (N, T) columns -> (N, T, D+columns): x·scale (a number or an
    (N, T, 1) tensor) with the columns beside it."""
    out = torch.empty(*x.shape[:-1], x.size(-1) + len(columns), device=x.device, dtype=x.dtype)
    torch.mul(x, scale, out=out[..., : x.size(-1)])
    for i, column in enumerate(columns, x.size(-1)):
        out[..., i] = column
    return out


def _parts(x, dtype):
    """float32 x as terms in dtype whose sum holds it to about float32's precision: x itself in
    float32, a bfloat16 head and its remainder in bfloat16 (to 16 bits rather than 8)."""
    if dtype == torch.float32:
        return [x]
    head = x.to(dtype)
    return [head, (x - head.float()).to(dtype)]


class Scratch:
    """Preallocated memory lent out as contiguous views of the shapes asked for (the last tiles of
    a row or column are smaller than the block); each shape's view is made once."""

    def __init__(self, numel, device, dtype=torch.float32):
        self.flat = torch.empty(numel, device=device, dtype=dtype)
        self.views = {}

    def __call__(self, *shape):
        view = self.views.get(shape)
        if view is None:
            view = self.views[shape] = self.flat[: math.prod(shape)].view(shape)
        return view


class Products:
    """Matmul products added into float32 accumulators. bfloat16 operands are multiplied in
    bfloat16 (accumulating in float32 inside the matmul, on the CPU's bfloat16 matrix units where
    it has them) and the product converted in a buffer kept for it: torch would allocate a new
    one (and the kernel map it) for every tile."""

    def __init__(self, numel, device, dtype):
        self.low = None if dtype == torch.float32 else Scratch(numel, device, dtype)
        self.high = None if dtype == torch.float32 else Scratch(numel, device)

    def add(self, acc, a, b, alpha=1):
        """acc += alpha·(a @ b)"""
        if self.low is None:
            return acc.baddbmm_(a, b, alpha=alpha)
        shape = (a.size(0), a.size(1), b.size(2))
        product = torch.bmm(a, b, out=self.low(*shape))
        return acc.add_(self.high(*shape).copy_(product), alpha=alpha)


class Blocks:
    """A tensor cut along dimension dim into contiguous pieces of `size` (if not None), the
    first ending at `phase`: oneDNN's bfloat16 matmul copies a strided slice of a tensor before
    multiplying it (6% of tiled's forward time), float32's reads it in place (and runs 7% slower
    on the cut pieces; one thread of an Intel Xeon with AMX). Called with a range, gives a view
    of the piece that holds it, or of the whole tensor for a range across pieces."""

    def __init__(self, x, dim, size, phase):
        self.x, self.dim = x, dim
        self.bounds = [0, *range(phase % size or size, x.size(dim), size)] if size else [0]
        ends = self.bounds[1:] + [x.size(dim)]
        self.pieces = [x.narrow(dim, a, b - a).contiguous() for a, b in zip(self.bounds, ends)]
        self.ends = ends

    def __call__(self, j0, j1):
        i = bisect.bisect_right(self.bounds, j0) - 1
        if j1 <= self.ends[i]:
            return self.pieces[i].narrow(self.dim, j0 - self.bounds[i], j1 - j0)
        return self.x.narrow(self.dim, j0, j1 - j0)


class Tiles:
    """Which tiles of the (Tq, Tk) scores are computed, and what is added to a tile's scores
    besides q·k: ALiBi's and the learned relative bias (in base 2, like the scores) and -inf
    where the causal mask or the window hides a key. A tile is named by its first query position
    i0 and first key j0; its rows are the G query heads of each key/value head (see _rows)."""

    def __init__(self, spec, batch, heads, kv_heads, tq, tk, slopes, table, buckets, device):
        self.spec = spec
        self.batch, self.heads, self.kv_heads = batch, heads, kv_heads
        self.group = heads // kv_heads
        self.tq, self.tk = tq, tk
        self.offset = tk - tq  # query i sits at absolute position offset + i
        # Row minus column in a whole tile (a row's first tile in the forward may be as wide as
        # the query block); a tile's distances are these plus one offset.
        rows = max(spec.block_q, spec.backward_blocks[0])
        self.rel = (torch.arange(rows, device=device).unsqueeze(1)
                    - torch.arange(max(rows, spec.block_k, spec.backward_blocks[1]),
                                   device=device))
        self.neg_slopes = None
        if slopes is not None:
            self.neg_slopes = (slopes.float() * -LOG2E).view(kv_heads, 1, self.group, 1)
        self.table = None if table is None else table.detach().float() * LOG2E
        self.buckets = buckets

    def for_backward(self):
        """These tiles in the backward's blocks."""
        tiles = copy.copy(self)
        tiles.spec = dataclasses.replace(self.spec, block_q=self.spec.backward_blocks[0],
                                         block_k=self.spec.backward_blocks[1])
        return tiles

    def keys(self, i0, i1):
        """The keys that queries i0 .. i1-1 see, as a range."""
        s = self.spec
        first = max(0, self.offset + i0 - s.window + 1) if s.window else 0
        return first, min(self.tk, self.offset + i1) if s.causal else self.tk

    def first_tile(self, i0, i1):
        """(first key seen, start, end): queries i0 .. i1-1 see keys first .. end-1, and the
        forward takes keys start .. end-1 first. With causal attention that tile reaches back to
        the block's first query, so that every row has seen a key, and has a finite maximum,
        after it; the forward then goes leftwards a key block at a time from start."""
        first, end = self.keys(i0, i1)
        start = max(first, end - self.spec.block_k)
        if self.spec.causal:
            start = max(first, min(start, self.offset + i0))
        return first, start, end

    def queries(self, j0, j1):
        """The queries that see some of keys j0 .. j1-1, as a range (possibly empty)."""
        s = self.spec
        first = max(0, j0 - self.offset) if s.causal else 0
        return first, min(self.tq, j1 + s.window - 1 - self.offset) if s.window else self.tq

    def _distances(self, rows, cols, i0, j0):
        """(rows, cols) query position minus key position in the tile."""
        return self.rel[:rows, :cols] + (self.offset + i0 - j0)

    def _bucket_of(self, dist):
        dist = dist.clamp(min=0) if self.spec.causal else dist.abs()  # the rest is masked
        return self.buckets[dist]

    def add_bias(self, s, i0, j0):
        """Add the biases and the mask to the (B·Hk, rows·G, cols) scores s of tile (i0, j0)."""
        rows, cols = s.size(1) // self.group, s.size(2)
        spec, d0 = self.spec, self.offset + i0 - j0
        # Some key after a query's position, or some key left of its window.
        late = spec.causal and j0 + cols - 1 > self.offset + i0
        early = spec.window and d0 + rows - 1 >= spec.window
        if self.neg_slopes is None and self.table is None and not (late or early):
            return
        by_head = s.view(self.batch, self.kv_heads, rows, self.group, cols)
        if self.neg_slopes is not None or self.table is not None:
            dist = self._distances(rows, cols, i0, j0)
            if self.neg_slopes is not None:
                alibi = dist if spec.causal else dist.abs()
                by_head.addcmul_(self.neg_slopes, alibi.view(rows, 1, cols).float())
            if self.table is not None:
                bias = self.table[:, self._bucket_of(dist)]  # (H, rows, cols)
                by_head.add_(bias.view(self.kv_heads, self.group, rows, cols).transpose(1, 2))
        if late or early:
            # In the scores' dtype: adding a float32 mask to bfloat16 scores takes ten times as
            # long as the matmul that made them.
            hidden = functools.partial(torch.full, (rows, cols), float("-inf"), device=s.device,
                                       dtype=s.dtype)
            mask = hidden().triu_(d0 + 1)
            if early:
                mask.add_(hidden().tril_(d0 - spec.window))
            by_head.add_(mask.view(rows, 1, cols))

    def add_table_grad(self, grad, ds, i0, j0):
        """Add to the relative table's gradient grad (H, buckets) the tile's dS, summed over the
        batch and by bucket."""
        rows, cols = ds.size(1) // self.group, ds.size(2)
        per_head = ds.view(self.batch, self.kv_heads, rows, self.group, cols).sum(
            0, dtype=torch.float32)
        per_head = per_head.transpose(1, 2).reshape(self.heads, rows * cols)
        buckets = self._bucket_of(self._distances(rows, cols, i0, j0))
        grad.index_add_(1, buckets.flatten(), per_head)


def forward(q, k, v, tiles):
    """q (N, Tq·G, D), k and v (N, Tk, D), all contiguous, N = B·Hk, in float32 or bfloat16 (the
    matmuls' dtype; the softmax's statistics and the output are float32 either way). Returns the
    output (N, Tq·G, D) and, for each row, in float32 (N, Tq·G), the maximum m that its
    probabilities were taken against (in base 2, held exactly in the matmuls' dtype) and the sum
    l of exp2(score - m)."""
    spec, g = tiles.spec, tiles.group
    n, _, d = q.shape
    dev, dtype = q.device, q.dtype
    block_rows = spec.block_q * g
    # With a cap the scores are cap·tanh(scale·q·k / cap): the scale goes into tanh's argument,
    # and the row maximum cannot be taken off inside the matmul.
    c = spec.scale / spec.softcap if spec.softcap else spec.scale * LOG2E
    fold = not spec.softcap
    # Keys transposed, with a row of ones under them: a query row whose extra column holds -m
    # then gets its scores minus its running maximum m from the matmul itself.
    keys = _ones_below(k)
    # Cut on the grid of the forward's key tiles (those left of every query block's first tile
    # fall on it when the query block is a multiple of the key block).
    phase = tiles.first_tile(0, min(spec.block_q, tiles.tq))[1]
    cut = None if dtype == torch.float32 else spec.block_k
    keys, v = Blocks(keys, 2, cut, phase), Blocks(v, 1, cut, phase)
    out = torch.empty(q.shape, device=dev)
    maxima, sums = (torch.empty(n, q.size(1), device=dev) for _ in range(2))
    q_buf = Scratch(n * block_rows * (d + 1), dev, dtype)
    acc_buf = Scratch(n * block_rows * d, dev)
    s_buf = Scratch(n * block_rows * max(spec.block_q, spec.block_k), dev, dtype)
    products = Products(n * block_rows * d, dev, dtype)
    for i0 in range(0, tiles.tq, spec.block_q):
        i1 = min(i0 + spec.block_q, tiles.tq)
        r0, r1 = i0 * g, i1 * g
        rows = r1 - r0
        qi = q_buf(n, rows, d + 1)
        torch.mul(q[:, r0:r1], c, out=qi[..., :d])
        acc = acc_buf(n, rows, d)

        def scores(j0, j1):
            """The tile's scores in base 2, capped, biased and masked, less the extra column."""
            s = torch.bmm(qi, keys(j0, j1), out=s_buf(n, rows, j1 - j0))
            if spec.softcap:
                s.tanh_().mul_(spec.softcap * LOG2E)
            tiles.add_bias(s, i0, j0)
            return s

        def accumulate(p, j0, j1):
            products.add(acc, p, v(j0, j1))

        def rescale(j0, j1, m, l):
            """The online softmax's full step: the tile's maximum, what was summed before it
            rescaled if the maximum rose, the tile added. Returns the new maximum."""
            qi[..., d] = 0
            s = scores(j0, j1)
            # Rounded to the matmuls' dtype, so that the extra column holds it exactly.
            m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True)).to(dtype)
            s.sub_(m_new).exp2_()
            m_new = m_new.float()
            correction = torch.exp2(m - m_new)
            l.mul_(correction).add_(s.sum(dim=-1, keepdim=True))
            acc.mul_(correction)
            accumulate(s, j0, j1)
            if fold:
                qi[..., d] = -m_new.squeeze(-1)
            return m_new

        first, start, end = tiles.first_tile(i0, i1)
        # From right to left: the nearest keys, which usually score highest (and always do
        # under ALiBi), have set each row's maximum, so later tiles rarely raise it. Lazy
        # rescaling: exponentiate every later tile against the maximum so far, and keep the
        # result if no row's sum exceeds LAZY_LIMIT (no score rose far above the maximum:
        # nothing overflowed, and a stale maximum costs no precision in float32); else redo the
        # block with a full rescaling step for every tile.
        for lazy in (True, False):
            acc.zero_()
            l = torch.zeros(n, rows, 1, device=dev)
            m = rescale(start, end, torch.full((n, rows, 1), MIN, device=dev), l)
            for j1 in range(start, first, -spec.block_k):
                j0 = max(first, j1 - spec.block_k)
                if not lazy:
                    m = rescale(j0, j1, m, l)
                    continue
                s = scores(j0, j1)
                if not fold:
                    s.sub_(m)
                l.add_(s.exp2_().sum(dim=-1, keepdim=True))
                accumulate(s, j0, j1)
            if not lazy or l.max() <= LAZY_LIMIT:
                break
        torch.div(acc, l, out=out[:, r0:r1])
        maxima[:, r0:r1], sums[:, r0:r1] = m.squeeze(-1), l.squeeze(-1)
    return out, maxima, sums


def backward(q, k, v, out, maxima, sums, grad_out, tiles):
    """Gradients of q, k and v (in the layouts of forward) given the forward's output, maxima
    and sums,
    and of the relative table (H, buckets) when there is one (else None). Outer loop over key
    blocks (their dK and dV stay in one buffer), inner over the query blocks that see them."""
    spec, g = tiles.spec, tiles.group
    n, _, d = q.shape
    block_rows = spec.block_q * g
    c = spec.scale / spec.softcap if spec.softcap else spec.scale * LOG2E
    dev, dtype = q.device, q.dtype
    neg_m = maxima.neg()
    # P = exp2(S - m) / l: the tiles are exponentiated against the forward's maxima m, so that
    # the largest probabilities come from the smallest exponents (exp2(S - lse) would round S -
    # lse, several units for every key, to bfloat16's 8 bits), and 1/l is taken into dO and
    # delta = rowsum(dO ∘ O) instead. The subtractions of m (without a cap) and of delta happen
    # inside the matmuls: extra columns beside the queries and output gradients (delta in
    # bfloat16 as a head and its remainder), rows of ones under each block of keys and values.
    inv_sums = sums.reciprocal()
    delta = (grad_out.float() * out).sum(dim=-1).mul_(inv_sums).neg_()
    queries = _beside(q, c, [torch.zeros_like(neg_m) if spec.softcap else neg_m])
    grads = _beside(grad_out, inv_sums[..., None], _parts(delta, dtype))
    dq = torch.zeros(q.shape, device=dev)
    dk = torch.empty(k.shape, device=dev)
    dv = torch.empty(v.shape, device=dev)
    dtable = None if tiles.table is None else torch.zeros_like(tiles.table)
    s_buf, dp_buf = (Scratch(n * block_rows * spec.block_k, dev, dtype) for _ in range(2))
    tanh_buf = Scratch(n * block_rows * spec.block_k, dev, dtype) if spec.softcap else None
    products = Products(n * max(block_rows, spec.block_k) * d, dev, dtype)
    for j0 in range(0, tiles.tk, spec.block_k):
        j1 = min(j0 + spec.block_k, tiles.tk)
        kj = k[:, j0:j1]
        keys = _ones_below(kj)
        values = _ones_below(v[:, j0:j1], grads.size(-1) - d)
        dkj, dvj = dk[:, j0:j1].zero_(), dv[:, j0:j1].zero_()
        first, end = tiles.queries(j0, j1)
        for i0 in range(first, end, spec.block_q):
            i1 = min(i0 + spec.block_q, end)
            r0, r1 = i0 * g, i1 * g
            shape = (n, r1 - r0, j1 - j0)
            # l·P = exp2(c·QKᵀ - m), or with a cap exp2(cap·tanh(c·QKᵀ) - m)
            p = torch.bmm(queries[:, r0:r1], keys,
                          out=(tanh_buf if spec.softcap else s_buf)(*shape))
            if spec.softcap:
                t = p.tanh_()
                p = torch.add(neg_m[:, r0:r1, None], t, alpha=spec.softcap * LOG2E,
                              out=s_buf(*shape))
            tiles.add_bias(p, i0, j0)
            p.exp2_()
            products.add(dvj, p.transpose(1, 2), grads[:, r0:r1, :d])
            # dS = P ∘ (dO Vᵀ - delta): the gradient of the capped, biased scores
            ds = torch.bmm(grads[:, r0:r1], values, out=dp_buf(*shape))
            ds.mul_(p)
            if dtable is not None:
                tiles.add_table_grad(dtable, ds, i0, j0)
            if spec.softcap:
                ds.mul_(t.square_().neg_().add_(1))  # d(cap·tanh(x/cap))/dx = 1 - tanh²
            products.add(dq[:, r0:r1], ds, kj, alpha=spec.scale)
            products.add(dkj, ds.transpose(1, 2), q[:, r0:r1], alpha=spec.scale)
    return dq, dk, dv, dtable


def matmul_dtype(dtype):
    """bfloat16 inputs are multiplied in bfloat16 (float32 accumulation inside each product,
    float32 softmax statistics and output); any other dtype in float32."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


class TiledAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, slopes, table, buckets, spec):
        b, h, tq, _ = q.shape
        # Autocast would run the matmuls in half precision; the tiles accumulate in float32.
        with torch.autocast(q.device.type, enabled=False):
            tiles = Tiles(spec, b, h, k.size(1), tq, k.size(2), slopes, table, buckets, q.device)
            dtype = matmul_dtype(q.dtype)
            qf, kf, vf = _rows(q, k.size(1), dtype), _flat(k, dtype), _flat(v, dtype)
            out, maxima, sums = forward(qf, kf, vf, tiles)
        ctx.save_for_backward(qf, kf, vf, out, maxima, sums)
        ctx.tiles = tiles
        ctx.dtypes = (q.dtype, k.dtype, v.dtype, None if table is None else table.dtype)
        return _unrows(out, b, h).to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, maxima, sums = ctx.saved_tensors
        tiles = ctx.tiles.for_backward()
        with torch.autocast(q.device.type, enabled=False):
            dq, dk, dv, dtable = backward(q, k, v, out, maxima, sums,
                                          _rows(grad_out, tiles.kv_heads, q.dtype), tiles)
        q_dtype, k_dtype, v_dtype, table_dtype = ctx.dtypes
        kv_shape = (tiles.batch, tiles.kv_heads, tiles.tk, -1)
        return (_unrows(dq, tiles.batch, tiles.heads).to(q_dtype), dk.view(kv_shape).to(k_dtype),
                dv.view(kv_shape).to(v_dtype), None,
                None if dtable is None else dtable.to(table_dtype), None, None)
