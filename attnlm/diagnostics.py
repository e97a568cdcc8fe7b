"""Seeing inside: the attention probabilities of one forward pass, and their entropy.

Attention weights show what each position gathered from which others, not why the model
decided what it did: the values gathered are transformed further by later layers and the MLPs.
"""

import contextlib
import math

import torch

from attnlm.attention import naive


@contextlib.contextmanager
def captured_attention(model):
    """Yields a list to which every forward pass inside the block appends each layer's attention
    probabilities, in layer order. Each layer's `attend` is wrapped for the while: the wrapper
    recomputes the probabilities from the q and k it is given (after any positional transform,
    whatever the backend), then calls the backend as before, so the outputs do not change."""
    captured = []
    layers = [block.attn for block in model.blocks]
    originals = [layer.attend for layer in layers]

    def spying_on(attend):
        def spy(q, k, v, *, dropout_p=0.0, **options):
            captured.append(naive.probabilities(q.float(), k.float(), **options))  # no dropout
            return attend(q, k, v, dropout_p=dropout_p, **options)
        return spy

    for layer, attend in zip(layers, originals):
        layer.attend = spying_on(attend)
    try:
        yield captured
    finally:
        for layer, attend in zip(layers, originals):
            layer.attend = attend


@torch.no_grad()
def attention_of(model, ids):
    """Per layer, the (H, T, T) attention probabilities of the model reading the token ids."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with captured_attention(model) as captured:
        model(torch.tensor([ids], device=device))
    model.train(was_training)
    return [probs[0].cpu() for probs in captured]


def entropy(probs):
    """Entropy in nats of each distribution along the last axis (0 log 0 counts as 0)."""
    return -torch.special.xlogy(probs, probs).sum(-1)


def uniform_causal_entropy(length):
    """The mean over query positions i = 0..T-1 of log(i + 1): the entropy that attention spread
    evenly over every visible key scores, and the most any causal attention can (= log(T!) / T)."""
    return math.lgamma(length + 1) / length


def entropy_report(maps):
    """Attention entropy per layer and head, each the mean over the text's T query positions of
    the entropy of that query's distribution over the keys it sees (query i sees i + 1 keys).

    max_entropy is the same mean for uniform attention, the largest possible; log_T is the
    largest a single query can reach, the last one, which sees all T keys."""
    length = maps[0].size(-1)
    return {
        "tokens": length,
        "entropy": [entropy(probs).mean(-1).tolist() for probs in maps],
        "max_entropy": uniform_causal_entropy(length),
        "log_T": math.log(length),
    }
