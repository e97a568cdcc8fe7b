"""The weight products of a decode step, in whichever of two forms this machine runs faster.

A step of one position multiplies one row per sequence by every weight matrix, so its time is the
time to read the weights. For F.linear of one row torch calls its BLAS's matrix product with a
single column, and how fast a BLAS reads the matrix for that depends on the library and the CPU:
on two cores of an AMD EPYC (torch 2.13 CPU, MKL 2024.0) that call read float32 weights at
11 GB/s, while the same product as one batched call of four products, each over a quarter of
the weight's rows, read them at 23 GB/s on one thread and 42 on two. Which form wins on another
machine is for that machine to say, so generation times both on the model's own layers before
its first step (once per process for each set of shapes, batch and thread count) and keeps the
faster. Both give the same numbers up to rounding.
"""

import functools
import time

import torch
from torch import nn

PARTS = 4
REPEATS = 3  # interleaved timings of each form; the fastest of each is compared
_split_wins = {}  # (weight shapes, dtype, rows, threads) -> whether split_linear was faster


def split_linear(layer, x):
    """layer(x) as one batched product of PARTS products over a quarter of the weight's rows."""
    weight = layer.weight
    rows = x.reshape(-1, x.size(-1)).t().expand(PARTS, -1, -1)
    y = torch.bmm(weight.view(PARTS, -1, weight.size(1)), rows)  # (PARTS, out / PARTS, N)
    y = y.permute(2, 0, 1).reshape(*x.shape[:-1], weight.size(0))
    return y if layer.bias is None else y + layer.bias.to(y.dtype)  # y's dtype under autocast


def splittable(model):
    """The model's linear layers whose (contiguous) rows split into PARTS equal parts, less any
    whose forward is already replaced on the instance: Split would lose it."""
    return [m for m in model.modules() if isinstance(m, nn.Linear) and "forward" not in vars(m)
            and m.out_features % PARTS == 0 and m.weight.is_contiguous()]


class Split:
    """A context in which each of layers computes through split_linear. Entered at every step,
    so it only sets and removes an instance attribute each (2 µs a step rather than the 50 of
    nn.Module's setattr for the 6-layer model)."""

    def __init__(self, layers):
        self.forwards = [(vars(layer), functools.partial(split_linear, layer)) for layer in layers]

    def __enter__(self):
        for attributes, forward in self.forwards:
            attributes["forward"] = forward

    def __exit__(self, *exc):
        for attributes, _ in self.forwards:
            del attributes["forward"]


def _seconds(form, layers, inputs):
    start = time.perf_counter()
    for layer, x in zip(layers, inputs):
        form(layer, x)
    return time.perf_counter() - start


def split_is_faster(layers, rows):
    """Whether split_linear beats nn.Linear's own product over layers for inputs of `rows`
    rows on this machine, as the calling context runs them."""
    if not layers:
        return False
    weight = layers[0].weight
    key = (tuple(layer.weight.shape for layer in layers), weight.dtype, rows,
           torch.get_num_threads())
    if key not in _split_wins:
        inputs = [weight.new_ones(rows, layer.in_features) for layer in layers]  # leaves the RNG be
        seconds = {split_linear: [], nn.Linear.forward: []}
        for _ in range(REPEATS):
            for form, times in seconds.items():
                times.append(_seconds(form, layers, inputs))
        _split_wins[key] = min(seconds[split_linear]) < min(seconds[nn.Linear.forward])
    return _split_wins[key]
