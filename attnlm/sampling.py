"""Sampling as free functions over logits, and the generation loop."""

import torch

from attnlm.errors import InputError


def check_controls(temperature, top_k):
    if temperature < 0:
        raise InputError(f"--temperature={temperature} must not be negative (0 means greedy)")
    if top_k < 0:
        raise InputError(f"--top-k={top_k} must not be negative (0 disables it)")


def apply_top_k(logits, k):
    """Keep the k largest logits of each row; the rest become -inf."""
    if not k or k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def next_token(logits, temperature, top_k, generator=None):
    """One token id per row of logits (B, vocab): greedy at temperature 0, else sampled."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    probs = torch.softmax(apply_top_k(logits.float() / temperature, top_k), dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=0, generator=None):
    """Yield (B, 1) token ids one step at a time, each predicted from the last block_size tokens."""
    block_size = model.cfg.block_size
    for _ in range(max_new_tokens):
        logits, _ = model(idx[:, -block_size:])
        token = next_token(logits[:, -1], temperature, top_k, generator)
        idx = torch.cat([idx, token], dim=1)
        yield token
