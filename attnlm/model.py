"""A causal decoder-only Transformer (GPT): embed, N pre-norm blocks, norm, tied output head.

The model config chooses among today's variants of each part (see README, "Model shapes"):
grouped-query attention (n_kv_head), sliding windows per layer (window, window_pattern),
QK-norm, soft-capped scores, LayerNorm or RMSNorm, and a GELU, SwiGLU or ReLU² MLP.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from attnlm.attention import get_backend
from attnlm.kv_cache import KVCache
from attnlm.positional import RelativeBias, Rotary, alibi_slopes, build_absolute


RMS_EPS = 1e-6  # RMSNorm's epsilon, as in Llama (torch's default depends on the dtype)


def kv_heads(cfg):
    """Key/value heads per layer: n_kv_head, or n_head when it is 0."""
    return cfg.n_kv_head or cfg.n_head


def layer_windows(cfg):
    """Each layer's sliding window (0: full causal attention): window_pattern repeated over the
    layers, S a windowed layer and L a full one; every layer windowed when the pattern is empty."""
    pattern = cfg.window_pattern or "S"
    return [cfg.window if pattern[i % len(pattern)] == "S" else 0 for i in range(cfg.n_layer)]


def mlp_width(cfg):
    """The MLP's hidden width: mlp_hidden, else 4·n_embd; SwiGLU's three matrices get 8/3·n_embd
    (rounded up to a multiple of 8) so that it has the parameters of the two-matrix MLPs."""
    if cfg.mlp_hidden:
        return cfg.mlp_hidden
    if cfg.mlp == "swiglu":
        return 8 * math.ceil(8 * cfg.n_embd / 3 / 8)
    return 4 * cfg.n_embd


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm with its gain and output in the input's dtype: under autocast, queries and keys
    arrive in bfloat16, and a float32 gain sends torch to its slow unfused path (with a warning);
    CUDA's autocast computes rms_norm in float32 (the CPU's does not), and queries and keys must
    reach attention in the values' dtype."""

    def forward(self, x):
        return F.rms_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.eps).to(x.dtype)


def norm(cfg, dim):
    return RMSNorm(dim, eps=RMS_EPS) if cfg.norm == "rmsnorm" else nn.LayerNorm(dim, bias=cfg.bias)


def dropout(p):
    # Identity when off: a decode step would otherwise pay 13 no-op dropout calls.
    return nn.Dropout(p) if p else nn.Identity()


def head_similarity(y):
    """Mean cosine similarity between the outputs of every pair of heads at the same position,
    y (B, H, T, D): the sum over pairs is |sum of unit vectors|² - H, so no (H, H) matrix."""
    heads = y.size(1)
    if heads < 2:
        return y.new_zeros(())
    unit = F.normalize(y.float(), dim=-1).sum(1)
    return ((unit * unit).sum(-1) - heads).mean() / (heads * (heads - 1))


class Attention(nn.Module):
    def __init__(self, cfg, layer):
        super().__init__()
        self.n_head, self.n_kv_head, self.layer = cfg.n_head, kv_heads(cfg), layer
        head_dim = cfg.n_embd // cfg.n_head
        # One product for the queries of every head and the keys and values of the kv heads.
        self.qkv = nn.Linear(cfg.n_embd, (self.n_head + 2 * self.n_kv_head) * head_dim, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.attend = get_backend(cfg.attention)
        self.attn_dropout = cfg.attn_dropout
        self.rotary = Rotary(head_dim, cfg.rope_base) if cfg.pos == "rope" else None
        self.q_norm = RMSNorm(head_dim, eps=RMS_EPS) if cfg.qk_norm else None
        self.k_norm = RMSNorm(head_dim, eps=RMS_EPS) if cfg.qk_norm else None
        self.relative = (RelativeBias(cfg.n_head, cfg.rel_buckets, cfg.rel_max_distance)
                         if cfg.pos == "relative" else None)
        # Additive (Bahdanau) scoring: w_h · tanh(q + k), one w per head.
        self.additive = (nn.Parameter(torch.randn(cfg.n_head, head_dim) / math.sqrt(head_dim))
                         if cfg.score == "additive" else None)
        # The dot product is divided by temperature·sqrt(head_dim), the additive score by the
        # temperature alone (its tanh is already bounded).
        root = math.sqrt(head_dim) if cfg.score == "dot" else 1.0
        self.scale = 1.0 / (cfg.attn_temperature * root)
        slopes = alibi_slopes(cfg.n_head) if cfg.pos == "alibi" else None
        self.register_buffer("alibi_slopes", slopes, persistent=False)  # follows from n_head
        # The options a backend is given only when set: the default call is today's plain one.
        window = layer_windows(cfg)[layer]
        self.options = {key: value for key, value in
                        (("window", window), ("softcap", cfg.softcap)) if value}

    def forward(self, x, cache=None, pos=0):
        B, T, C = x.shape
        heads = self.qkv(x).view(B, T, self.n_head + 2 * self.n_kv_head, -1).transpose(1, 2)
        q, k, v = heads.split((self.n_head, self.n_kv_head, self.n_kv_head), dim=1)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rotary is not None:
            # Before the cache: each key is rotated once, at its absolute position, and kept so.
            q, k = self.rotary(q, pos), self.rotary(k, pos)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        options = dict(self.options)
        if self.alibi_slopes is not None:
            options["alibi_slopes"] = self.alibi_slopes
        if self.relative is not None:
            options["relative"] = self.relative(k.size(2))
        if self.additive is not None:
            options["additive"] = self.additive
        if self.training and self.attn_dropout:
            options["dropout_p"] = self.attn_dropout
        y = self.attend(q, k, v, causal=True, scale=self.scale, **options)
        return self.proj(y.transpose(1, 2).reshape(B, T, C)), y


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        width = mlp_width(cfg)
        self.kind = cfg.mlp
        # SwiGLU's gate and up projections in one product: (x W_gate, x W_up) side by side.
        self.fc = nn.Linear(cfg.n_embd, 2 * width if cfg.mlp == "swiglu" else width, bias=cfg.bias)
        self.proj = nn.Linear(width, cfg.n_embd, bias=cfg.bias)
        # gelu_tanh: GPT-2's tanh approximation, so that an imported GPT-2 computes what it learned
        self.approximate = "tanh" if cfg.activation == "gelu_tanh" else "none"

    def forward(self, x):
        h = self.fc(x)
        if self.kind == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        elif self.kind == "relu2":
            h = F.relu(h).square()
        else:
            h = F.gelu(h, approximate=self.approximate)
        return self.proj(h)


class Block(nn.Module):
    def __init__(self, cfg, layer):
        super().__init__()
        self.norm1 = norm(cfg, cfg.n_embd)
        self.attn = Attention(cfg, layer)
        self.norm2 = norm(cfg, cfg.n_embd)
        self.mlp = MLP(cfg)
        self.drop = dropout(cfg.dropout)
        self.residual_scale = cfg.residual_scale

    def branch(self, y):
        y = self.drop(y)
        return y if self.residual_scale == 1 else y * self.residual_scale

    def forward(self, x, cache=None, pos=0, with_similarity=False):
        """The block's output and, with_similarity, its heads' mean output similarity too (as a
        result: FSDP2 hands a block copies of arguments that hold tensors, so a list passed in to
        be appended to would stay empty)."""
        y, heads = self.attn(self.norm1(x), cache, pos)
        x = x + self.branch(y)
        x = x + self.branch(self.mlp(self.norm2(x)))
        return (x, head_similarity(heads)) if with_similarity else x


class GPT(nn.Module):
    def __init__(self, cfg, vocab_size):
        super().__init__()
        self.cfg, self.vocab_size = cfg, vocab_size
        self.tok_emb = nn.Embedding(vocab_size, cfg.n_embd)
        self.pos_emb = build_absolute(cfg.pos, cfg.block_size, cfg.n_embd)
        self.drop = dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = norm(cfg, cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight  # tied: one matrix reads and writes tokens
        self.apply(self._init_weights)
        # GPT-2: scale residual projections so the residual stream's variance stays put with depth.
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def new_cache(self, batch, max_len):
        c, w = self.cfg, self.tok_emb.weight
        return KVCache(layer_windows(c), batch, kv_heads(c), max_len, c.n_embd // c.n_head,
                       w.device, w.dtype)

    def forward(self, idx, targets=None, cache=None, pos=None, last_only=False, head_diversity=0.0):
        """Logits (B, T, vocab) for tokens idx (B, T) and, with targets, the mean cross-entropy.

        The tokens sit at positions pos.. (default 0). With a cache they continue it: they are
        at positions cache.length.., their keys and values are stored and the earlier ones
        reused. last_only keeps the last position's logits alone (B, 1, vocab): all that
        decoding needs, sparing the head's product for the others. head_diversity > 0 adds that
        weight times the heads' mean output similarity (over layers) to the loss, a penalty on
        heads that do the same thing."""
        if cache is not None:
            if pos not in (None, cache.length):
                raise ValueError(f"the cache holds {cache.length} positions; asked to go on at {pos}")
            pos = cache.length
        pos = pos or 0
        x = self.tok_emb(idx)
        if self.pos_emb is not None:
            x = x + self.pos_emb(pos, idx.size(1))
        x = self.drop(x)
        penalised = bool(head_diversity) and targets is not None
        similarities = []
        for block in self.blocks:
            if penalised:
                x, similarity = block(x, cache, pos, with_similarity=True)
                similarities.append(similarity)
            else:
                x = block(x, cache, pos)
        if cache is not None:
            cache.advance(idx.size(1))
        if last_only:
            x = x[:, -1:]
        logits = self.head(self.norm(x))
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        if similarities:
            loss = loss + head_diversity * torch.stack(similarities).mean()
        return logits, loss
