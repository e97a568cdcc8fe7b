"""The eval pipeline: loss, perplexity and bits per byte of a model on a split of tokens, exact
match on a synthetic task, attention entropy, head similarity and maps; `evaluate_run` returns
the result the CLI prints."""

import math

import torch

from attnlm import diagnostics, tasks
from attnlm.data import BatchSampler, prepare_source, prepare_training, windows
from attnlm.errors import InputError
from attnlm.model import layer_windows
from attnlm.positional import check_context
from attnlm.runtime import autocast, keep_freed_memory


@torch.no_grad()
def split_loss(model, split, block_size, batch_size, device, dtype="float32", max_batches=0, seed=0,
               offset=0):
    """Mean loss per predicted token: over the whole split (max_batches=0, each token once), or
    over max_batches random windows drawn from a fixed seed (the same windows every call). Each
    window sits at positions offset.. (0: from the start)."""
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
            _, loss = model(x.to(device), y.to(device), pos=offset)
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
        "bits_per_byte": loss * split.tokens_per_byte / math.log(2),
        "tokens": len(split),
        "bytes": split.n_bytes,
    }


def _text_split(cfg, tokenizer, source):
    """(split, its name): the whole of source, or the run's val split."""
    if source is not None:  # an empty one is refused, not taken for the val split
        try:
            return prepare_source(source, tokenizer, cfg.data.cache_dir, progress=True), source
        except InputError as err:  # say which text, where the message does not
            if str(err).startswith("data.source"):
                raise
            raise InputError(f"data.source={source!r}: {err}") from None
    return prepare_training(cfg, tokenizer, progress=True)[1]["val"], f"{cfg.data.source} (val)"


def evaluate_run(model, tokenizer, cfg, *, source=None, batch_size=16, block_size=None,
                 offset=0, examples=500, attention=False, text=None, attention_map=None):
    """The eval result (a dict) of a loaded run's model on source or its val split: report()'s
    figures, each window read at positions offset..; on a synthetic task, exact match on
    `examples` held-out prompts; with attention (or attention_map, a folder for PNG heat maps,
    or text), the entropy of each layer's and head's attention and the similarity of each
    layer's heads on `text` (default: the first block_size tokens of the split)."""
    block_size = block_size or cfg.model.block_size
    check_context(cfg.model.pos, cfg.model.block_size, block_size)
    if cfg.model.pos == "learned" and offset + block_size > cfg.model.block_size:
        raise InputError(f"--offset {offset} puts windows at positions up to "
                         f"{offset + block_size - 1}; model.pos=learned has positions 0 to "
                         f"{cfg.model.block_size - 1} only")
    split, name = _text_split(cfg, tokenizer, source)
    if len(split) < 2:
        raise InputError(f"{name} has too little text to evaluate ({len(split)} tokens)")
    device = next(model.parameters()).device
    # Each batch's activations are the next one's: kept, they are not faulted in again (the
    # 6-layer, width-384 model's val split, 2 cores of an AMD EPYC: a fifth less time).
    keep_freed_memory()
    loss = split_loss(model, split, block_size, batch_size, device, offset=offset)
    result = {"source": name, "block_size": block_size, **report(loss, split)}
    if offset:
        result["offset"] = offset
    spec = cfg.data.source if source is None else source
    if tasks.is_synthetic(spec):
        result.update(tasks.evaluate(model, tokenizer, spec, examples, cfg.data.source))
    if attention or attention_map or text is not None:  # a --text is for the attention report
        ids = split.tokens[:block_size].tolist() if text is None else tokenizer.encode(text)
        if not 0 < len(ids) <= block_size:
            raise InputError(f"--text is {len(ids)} tokens long and the model reads at most "
                             f"{block_size} at once: give a shorter text (at least 1 token)")
        maps = diagnostics.attention_of(model, ids)
        result["attention"] = {**diagnostics.entropy_report(maps, layer_windows(model.cfg)),
                               **diagnostics.similarity_report(maps), "head_output_similarity":
                               diagnostics.head_output_similarity(model, ids)}
        # Means over the layers (and heads) for the table of `attnlm gather`, which leaves out
        # the per-layer lists.
        entropies = [e for heads in result["attention"]["entropy"] for e in heads]
        result["attention_entropy"] = sum(entropies) / len(entropies)
        layers = [s for s in result["attention"]["head_similarity"] if s is not None]
        result["head_similarity"] = sum(layers) / len(layers) if layers else None
        outputs = result["attention"]["head_output_similarity"]
        result["head_output_similarity"] = sum(outputs) / len(outputs)
        if attention_map:
            from attnlm.plots import attention_maps

            pieces = [tokenizer.decode([i]) for i in ids]
            paths = attention_maps(maps, result["attention"]["entropy"], pieces, attention_map)
            result["attention"]["maps"] = [str(p) for p in paths]
    return result


def describe(result):
    """The lines `attnlm eval` prints for a result of evaluate_run."""
    lines = [f"{result['source']}: loss {result['loss']:.4f}, perplexity {result['perplexity']:.2f}, "
             f"bits/byte {result['bits_per_byte']:.4f} over {result['tokens']:,} tokens"
             + (f", each window at positions {result['offset']}.." if "offset" in result else "")]
    if "exact_match" in result:
        lines.append(f"exact match {result['exact_match']:.2%} on {result['examples']} held-out "
                     f"examples (uniform guessing: {result['chance']:.2g})")
    if "attention" in result:
        a = result["attention"]
        lines.append(f"attention entropy in nats, mean over {a['tokens']} query positions "
                     f"per head, and for uniform attention over the keys each query sees, the "
                     f"most it can be (log T: {a['log_T']:.2f}):")
        lines += [f"  layer {layer}: " + "  ".join(f"{e:.2f}" for e in heads) + f"  (uniform {top:.2f})"
                  for layer, (heads, top) in enumerate(zip(a["entropy"], a["max_entropy"]))]
        lines.append("head similarity, 1 - Jensen-Shannon divergence in bits between two heads' "
                     "weights, mean over query positions 1.. and pairs of heads (1: alike, "
                     "0: disjoint):")
        lines += [f"  layer {layer}: " + ("n/a" if s is None else f"{s:.3f}")
                  for layer, s in enumerate(a["head_similarity"])]
        lines.append("head output similarity, cosine between two heads' outputs at a position, "
                     "mean over positions and pairs (what train.head_diversity penalises):")
        lines += [f"  layer {layer}: {s:.3f}" for layer, s in enumerate(a["head_output_similarity"])]
        lines += [f"wrote {path}" for path in a.get("maps", [])]
    return lines
