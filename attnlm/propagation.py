"""How a stack of blocks carries signals at initialisation, layer by layer: the growth of the
residual stream through each block, the gradient that reaches each block's input, and the
largest singular value of each block's input-output Jacobian (`attnlm inspect`); and the
gradient reaching each attention layer's query and key weights, which vanishes where the softmax
saturates (too low a temperature) or goes flat (too high).

A block maps the residual stream x to x + branch(x): its Jacobian is I + J_branch, so a stack
neither explodes nor vanishes when every block's Jacobian stays near norm 1.
"""

import dataclasses
import math

import torch

from attnlm.errors import InputError
from attnlm.model import GPT


def initial_model(model_cfg, vocab_size, seed, device="cpu"):
    """The model `attnlm train` would start from with this seed, in eval mode, on the naive
    backend: every backend computes the same function, and naive's plain operations are the ones
    that second derivatives (for the Jacobian's products) run through."""
    torch.manual_seed(seed)
    return GPT(dataclasses.replace(model_cfg, attention="naive"), vocab_size).to(device).eval()


def naive_copy(model):
    """The same model (the same weights) on the naive backend, in eval mode: see initial_model."""
    copy = GPT(dataclasses.replace(model.cfg, attention="naive"), model.vocab_size)
    copy.load_state_dict(model.state_dict())
    return copy.to(next(model.parameters()).device).eval()


def text_windows(tokens, batch_size, length):
    """(batch_size, length) token ids: consecutive windows from the start of a token array, as
    many as it holds up to batch_size (at least one)."""
    count = min(batch_size, len(tokens) // length)
    if count == 0:
        raise InputError(f"the text has {len(tokens)} tokens; a window needs {length}")
    return torch.as_tensor(tokens[:count * length]).long().view(count, length)


def rms(x):
    """Root mean square of every element of x."""
    return x.pow(2).mean().sqrt().item()


def jacobian_norm(f, x, iterations, generator):
    """The largest singular value of the Jacobian J of f at x, by power iteration on J^T J,
    never forming J. One forward pass, kept: J^T w is a backward pass (vjp); J v is the
    backward pass of that linear map of w (the double-vjp form of a jvp), which runs through
    any operation with a differentiable backward, custom autograd Functions included."""
    x = x.detach().requires_grad_()
    y = f(x)
    w = torch.zeros_like(y, requires_grad=True)
    (pulled,) = torch.autograd.grad(y, x, w, create_graph=True)  # J^T w, linear in w

    def push(v):  # J v
        return torch.autograd.grad(pulled, w, v, retain_graph=True)[0]

    v = torch.randn(x.shape, generator=generator).to(x)
    v /= v.norm()
    for _ in range(iterations):
        (v,) = torch.autograd.grad(y, x, push(v), retain_graph=True)
        v /= v.norm()
    return push(v).norm().item()  # ||J v|| for a unit v: the singular value v has converged to


def _streams(model, ids, targets):
    """The residual stream entering and leaving each block in one forward pass, the entering one
    with its gradient from the loss, and the loss."""
    entering, leaving = [], []

    def keep(block, args, out):
        args[0].retain_grad()
        entering.append(args[0])
        leaving.append(out)

    hooks = [block.register_forward_hook(keep) for block in model.blocks]
    try:
        _, loss = model(ids, targets)
    finally:
        for hook in hooks:
            hook.remove()
    loss.backward()
    return entering, leaving, loss.item()


def random_tokens(vocab_size, batch_size, length, seed):
    """(batch_size, length) token ids drawn uniformly from a seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(vocab_size, (batch_size, length), generator=generator)


def query_key_grad_norm(attn):
    """The norm of the gradient on the weights that make an attention layer's queries and keys
    (the rows of its qkv product before the values'): what reaches the scores, and vanishes where
    the softmax saturates or goes flat."""
    head_dim = attn.qkv.weight.size(0) // (attn.n_head + 2 * attn.n_kv_head)
    return attn.qkv.weight.grad[:(attn.n_head + attn.n_kv_head) * head_dim].norm().item()


def propagation(model, tokens, *, iterations=50, seed=0):
    """The depth report (a dict) of a model reading tokens (B, T + 1), each window predicting its
    next tokens: per block, the RMS of the residual stream entering and leaving it and their
    ratio (growth), the norm of the loss's gradient reaching its input, and the largest singular
    value of its Jacobian (from `iterations` steps of power iteration, seeded)."""
    generator = torch.Generator().manual_seed(seed)
    tokens = tokens.to(next(model.parameters()).device)
    entering, leaving, loss = _streams(model, tokens[:, :-1], tokens[:, 1:])
    layers = []
    for i, (block, x, y) in enumerate(zip(model.blocks, entering, leaving)):
        layers.append({
            "layer": i, "rms_in": rms(x), "rms_out": rms(y), "growth": rms(y) / rms(x),
            "grad_norm": x.grad.norm().item(), "qk_grad_norm": query_key_grad_norm(block.attn),
            "jacobian_norm": jacobian_norm(block, x.detach(), iterations, generator),
        })
    return {"n_layer": len(layers), "residual_scale": model.cfg.residual_scale,
            "batch_size": tokens.size(0), "tokens": tokens.size(1) - 1, "loss": loss,
            "uniform_loss": math.log(model.vocab_size),
            "growth": layers[-1]["rms_out"] / layers[0]["rms_in"], "layers": layers}


def describe(report):
    """The lines `attnlm inspect` prints for a report of propagation()."""
    lines = [f"{report['model']}, {report['n_layer']} blocks, residual_scale "
             f"{report['residual_scale']:g}, on {report['batch_size']} windows of "
             f"{report['tokens']} {report['text']} tokens: loss {report['loss']:.3f} (uniform guessing "
             f"{report['uniform_loss']:.3f}); RMS of the residual stream grows "
             f"{report['growth']:.3g}x from the first block's input to the last block's output",
             f"{'layer':>5}  {'RMS in':>9}  {'RMS out':>9}  {'growth':>7}  {'grad norm in':>12}  "
             f"{'grad norm q,k':>13}  {'Jacobian norm':>13}"]
    lines += [f"{r['layer']:>5}  {r['rms_in']:>9.4g}  {r['rms_out']:>9.4g}  {r['growth']:>7.4f}  "
              f"{r['grad_norm']:>12.4g}  {r['qk_grad_norm']:>13.4g}  {r['jacobian_norm']:>13.4f}"
              for r in report["layers"]]
    return lines
