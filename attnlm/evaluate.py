"""Loss, perplexity and bits per byte of a model on a split of tokens."""

import math

import torch

from attnlm.data import BatchSampler, windows
from attnlm.runtime import autocast


@torch.no_grad()
def split_loss(model, split, block_size, batch_size, device, dtype="float32", max_batches=0, seed=0):
    """Mean loss per predicted token: over the whole split (max_batches=0, each token once), or
    over max_batches random windows drawn from a fixed seed (the same windows every call)."""
    was_training = model.training
    model.eval()
    if max_batches:
        sampler = BatchSampler(split, block_size, batch_size, seed)
        batches = (sampler.next() for _ in range(max_batches))
    else:
        batches = windows(split, block_size, batch_size)
    total, count = 0.0, 0
    for x, y in batches:
        with autocast(device, dtype):
            _, loss = model(x.to(device), y.to(device))
        total += loss.item() * y.numel()
        count += y.numel()
    model.train(was_training)
    return total / count


def report(loss, split):
    """Loss per token, perplexity, and bits per byte: nats per token times tokens per byte, in
    bits, so models with different tokenizers compare on the same text."""
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "bits_per_byte": loss * len(split) / (split.n_bytes * math.log(2)),
        "tokens": len(split),
        "bytes": split.n_bytes,
    }
