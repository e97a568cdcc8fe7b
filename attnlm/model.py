"""A causal decoder-only Transformer (GPT): embed, N pre-norm blocks, norm, tied output head."""

import math

import torch.nn.functional as F
from torch import nn

from attnlm.attention import get_backend
from attnlm.kv_cache import KVCache
from attnlm.positional import Rotary, alibi_slopes, build_absolute


def dropout(p):
    # Identity when off: a decode step would otherwise pay 13 no-op dropout calls.
    return nn.Dropout(p) if p else nn.Identity()


class Attention(nn.Module):
    def __init__(self, cfg, layer):
        super().__init__()
        self.n_head, self.layer = cfg.n_head, layer
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.attend = get_backend(cfg.attention)
        self.attn_dropout = cfg.attn_dropout
        self.rotary = Rotary(cfg.n_embd // cfg.n_head, cfg.rope_base) if cfg.pos == "rope" else None
        slopes = alibi_slopes(cfg.n_head) if cfg.pos == "alibi" else None
        self.register_buffer("alibi_slopes", slopes, persistent=False)  # follows from n_head

    def forward(self, x, cache=None, pos=0):
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_head, -1).permute(2, 0, 3, 1, 4)  # 3, B, H, T, D
        q, k, v = qkv
        if self.rotary is not None:
            # Before the cache: each key is rotated once, at its absolute position, and kept so.
            q, k = self.rotary(qkv[:2], pos)  # queries and keys in one pass
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        y = self.attend(q, k, v, causal=True, scale=1.0 / math.sqrt(q.size(-1)),
                        dropout_p=self.attn_dropout if self.training else 0.0,
                        alibi_slopes=self.alibi_slopes)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        # gelu_tanh: GPT-2's tanh approximation, so that an imported GPT-2 computes what it learned
        self.approximate = "tanh" if cfg.activation == "gelu_tanh" else "none"

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x), approximate=self.approximate))


class Block(nn.Module):
    def __init__(self, cfg, layer):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = Attention(cfg, layer)
        self.norm2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)
        self.drop = dropout(cfg.dropout)

    def forward(self, x, cache=None, pos=0):
        x = x + self.drop(self.attn(self.norm1(x), cache, pos))
        return x + self.drop(self.mlp(self.norm2(x)))


class GPT(nn.Module):
    def __init__(self, cfg, vocab_size):
        super().__init__()
        self.cfg, self.vocab_size = cfg, vocab_size
        self.tok_emb = nn.Embedding(vocab_size, cfg.n_embd)
        self.pos_emb = build_absolute(cfg.pos, cfg.block_size, cfg.n_embd)
        self.drop = dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
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
        c = self.cfg
        w = self.tok_emb.weight
        return KVCache(c.n_layer, batch, c.n_head, max_len, c.n_embd // c.n_head, w.device, w.dtype)

    def forward(self, idx, targets=None, cache=None, pos=None, last_only=False):
        """Logits (B, T, vocab) for tokens idx (B, T) and, with targets, the mean cross-entropy.

        The tokens sit at positions pos.. (default 0). With a cache they continue it: they are
        at positions cache.length.., their keys and values are stored and the earlier ones
        reused. last_only keeps the last position's logits alone (B, 1, vocab): all that
        decoding needs, sparing the head's product for the others."""
        if cache is not None:
            if pos not in (None, cache.length):
                raise ValueError(f"the cache holds {cache.length} positions; asked to go on at {pos}")
            pos = cache.length
        pos = pos or 0
        x = self.tok_emb(idx)
        if self.pos_emb is not None:
            x = x + self.pos_emb(pos, idx.size(1))
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, cache, pos)
        if cache is not None:
            cache.advance(idx.size(1))
        if last_only:
            x = x[:, -1:]
        logits = self.head(self.norm(x))
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        return logits, loss
