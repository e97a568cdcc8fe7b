"""Seeing inside: the attention probabilities of one forward pass, their entropy, and how
alike the heads of a layer attend.

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
            additive = options.get("additive")  # the only weight among the options
            in_float = {**options, "additive": additive.float()} if additive is not None else options
            captured.append(naive.probabilities(q.float(), k.float(), **in_float))  # no dropout
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


def uniform_entropy(length, window=0):
    """The mean over query positions i = 0..T-1 of log(the number of keys query i sees): i + 1,
    at most `window` in a windowed layer (0: no window). The entropy of attention spread evenly
    over every visible key, the most any such attention can score (log(T!) / T when full)."""
    seen = min(window, length) if window else length
    return (math.lgamma(seen + 1) + (length - seen) * math.log(seen)) / length


def entropy_report(maps, windows):
    """Attention entropy per layer and head, each the mean over the text's T query positions of
    the entropy of that query's distribution over the keys it sees (windows: each layer's window,
    0 for full causal attention).

    max_entropy is, per layer, the same mean for uniform attention, the largest possible; log_T
    is the largest a single query of a full layer can reach, the last one, which sees all T keys."""
    length = maps[0].size(-1)
    return {
        "tokens": length,
        "entropy": [entropy(probs).mean(-1).tolist() for probs in maps],
        "max_entropy": [uniform_entropy(length, window) for window in windows],
        "log_T": math.log(length),
    }


def js_divergence(p, q):
    """Jensen-Shannon divergence in bits between distributions along the last axis: 0 for equal
    distributions, 1 for distributions with no key in common."""
    mean = (p + q) / 2
    return (_kl(p, mean) + _kl(q, mean)) / (2 * math.log(2))


def _kl(p, q):
    """Kullback-Leibler divergence in nats along the last axis (0 log 0 counts as 0)."""
    return (torch.special.xlogy(p, p) - torch.special.xlogy(p, q)).sum(-1)


def head_similarity(probs):
    """(H, H) similarity of one layer's heads from its (H, T, T) attention probabilities: for
    each pair, 1 - the Jensen-Shannon divergence (bits) of their distributions over the keys,
    averaged over query positions 1..T-1 (query 0 sees key 0 alone: there every head agrees).
    1: the heads attend alike; 0: never to the same keys. NaN for a one-token text."""
    # float64: halving a float32 weight near its smallest (1e-45) would give 0, and log 0 -inf
    later = probs[:, 1:].double()
    return torch.stack([1 - js_divergence(head, later).mean(-1) for head in later]).float()


def similarity_report(maps):
    """Per layer, the mean similarity over its pairs of heads (head_similarity), and the
    (H, H) similarities of each pair (head_similarity_pairs); None where there is no pair of
    heads or no query after the first."""
    pairs = [head_similarity(probs) for probs in maps]
    means = [s[~torch.eye(len(s), dtype=torch.bool)].mean().item() if len(s) > 1 else math.nan
             for s in pairs]
    return {"head_similarity": [_finite(m) for m in means],
            "head_similarity_pairs": [[[_finite(x) for x in row] for row in s.tolist()]
                                      for s in pairs]}


def _finite(x):
    """x, or None for NaN: JSON has no NaN."""
    return x if math.isfinite(x) else None


@torch.no_grad()
def head_output_similarity(model, ids):
    """Per layer, the mean cosine similarity between its heads' outputs at the same position
    (model.head_similarity: what train.head_diversity penalises) on the model reading ids."""
    from attnlm.model import head_similarity

    device = next(model.parameters()).device
    found = []
    hooks = [block.attn.register_forward_hook(lambda layer, args, out: found.append(out[1]))
             for block in model.blocks]
    was_training = model.training
    model.eval()
    try:
        model(torch.tensor([ids], device=device))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return [head_similarity(heads).item() for heads in found]
