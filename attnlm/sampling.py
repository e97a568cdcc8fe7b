"""Sampling: logits processors as free functions, the generation loop (KV-cached or not), and
the text side of streaming (incremental detokenizing, stop strings).

The context window. A model reads at most block_size tokens. When the window is full, it keeps
its last half (block_size // 2 tokens), which is re-read in one pass at positions 0.., and
generation goes on from there. The cached and the uncached path follow this one rule, so they
produce the same tokens.

A model whose every layer attends through a sliding window, with positions that go on past
block_size (any scheme but learned), has no such limit: each token's keys and values are needed
only a window's length back, so it generates without end, each layer's cache a ring of `window`
positions, and never re-reads the text. Its uncached path reads, at their own positions, the
last tokens that the windows of all layers together reach back to: the same logits as a forward
pass over the whole text.
"""

import contextlib
from dataclasses import dataclass

import torch

from attnlm.decode_products import Split, split_is_faster, splittable
from attnlm.model import layer_windows
from attnlm.runtime import compiled

@dataclass(frozen=True)
class Controls:
    """How the next token is chosen; the defaults change nothing (plain sampling). Ranges are
    checked where the values are set, by config.validate (sample.*)."""

    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 disables
    top_p: float = 1.0  # 1 disables
    min_p: float = 0.0  # 0 disables
    repetition_penalty: float = 1.0  # 1 disables

    @classmethod
    def of(cls, sample):
        """The controls of a SampleConfig (a run config's validated `sample` section)."""
        return cls(sample.temperature, sample.top_k, sample.top_p, sample.min_p,
                   sample.repetition_penalty)


# Logits processors: (B, V) logits in, (B, V) logits out; a removed token's logit becomes -inf.

def apply_repetition_penalty(logits, seen, penalty):
    """CTRL's penalty (Keskar et al., 2019): the logit of every token in `seen` (a (B, V) bool
    mask of the tokens already in the sequence) is divided by `penalty` if positive and
    multiplied by it if not, so penalty > 1 makes repeats less likely either way."""
    if penalty == 1:
        return logits
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def apply_temperature(logits, temperature):
    return logits if temperature == 1 else logits / temperature


def apply_top_k(logits, k):
    """Keep the k largest logits of each row (and any tied with the k-th)."""
    if not k or k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits, p):
    """Nucleus filtering: keep the smallest set of likeliest tokens whose probability mass
    reaches p (and any tied with the least likely of them). A token stays while the mass of the
    tokens likelier than it is below p."""
    if p >= 1:
        return logits
    ordered = torch.sort(logits, dim=-1, descending=True).values
    probs = torch.softmax(ordered, dim=-1)
    dropped = probs.cumsum(dim=-1) - probs >= p  # never the first: the likeliest token stays
    least = ordered.masked_fill(dropped, float("inf")).amin(dim=-1, keepdim=True)
    return logits.masked_fill(logits < least, float("-inf"))


def apply_min_p(logits, min_p):
    """Keep the tokens whose probability is at least min_p times the likeliest one's."""
    if min_p <= 0:
        return logits
    probs = torch.softmax(logits, dim=-1)
    return logits.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), float("-inf"))


def next_token(logits, controls, seen=None, generator=None):
    """One token id per row of logits (B, V), as a (B,) tensor. Order: repetition penalty,
    then greedy (temperature 0) or temperature, top-k, top-p, min-p and a draw."""
    logits = logits.float()
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, controls.repetition_penalty)
    if controls.temperature == 0:
        return logits.argmax(dim=-1)
    logits = apply_temperature(logits, controls.temperature)
    logits = apply_min_p(apply_top_p(apply_top_k(logits, controls.top_k), controls.top_p),
                         controls.min_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def endless(cfg):
    """Whether a model of ModelConfig cfg generates past block_size without cropping (see the
    module's docstring)."""
    return all(layer_windows(cfg)) and cfg.pos != "learned"


@contextlib.contextmanager
def without_onednn():
    """torch's own CPU kernels in place of oneDNN's while inside. A decode step of one position
    per row is a few thousand numbers per operation, too few to pay for oneDNN's set-up on every
    call (its GELU alone took 3 times aten's on an Intel Xeon); and its matrix-vector products are no faster. A
    prompt keeps oneDNN: in bfloat16 its matrix products are many times faster than aten's."""
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = enabled


def forward_last(model, tokens, cache, pos, products=contextlib.nullcontext()):
    """The model's logits at the last of tokens (B, T): (B, 1, vocab); a one-position step
    without oneDNN (see without_onednn) and inside products (a decode_products.Split)."""
    if tokens.size(1) > 1:
        return model(tokens, cache=cache, pos=pos, last_only=True)[0]
    with without_onednn(), products:
        return model(tokens, cache=cache, pos=pos, last_only=True)[0]


def step_products(model, rows):
    """A Split of the model's layers for cached steps of `rows` rows: all that split, if their
    split products were measured faster here, else none."""
    layers = splittable(model)
    with without_onednn():  # as the steps run
        return Split(layers if split_is_faster(layers, rows) else ())


@torch.inference_mode()
def generate(model, prompt, max_new_tokens, controls=Controls(), generator=None, use_cache=True,
             num_samples=1, split_products=True):
    """Yield the next token of every sample, a (B·num_samples,) tensor, max_new_tokens times.

    prompt is (B, T), T >= 1; a longer prompt than block_size keeps its last block_size tokens.
    Row r + i·B of the output is sample i of prompt row r. The prompt is read once, in one pass,
    for all its samples. With use_cache, its keys and values go to a KV cache allocated once
    and then each step reads one token; without, every step re-reads the whole window (the
    reference). The window rule is in the module's docstring. On the CPU a cached step
    splits its weight products where that was measured faster here (see decode_products);
    split_products=False keeps them whole, as a model under torch.compile needs.
    """
    if not max_new_tokens:
        return
    cfg = model.cfg
    block, without_end = cfg.block_size, endless(cfg)
    keep = max(1, block // 2)
    reach = sum(window - 1 for window in layer_windows(cfg)) + 1  # used without_end only
    prompt = prompt[:, -block:]
    length = prompt.size(1)
    rows = prompt.size(0) * num_samples
    tokens = prompt.new_empty(rows, length + max_new_tokens)  # the whole sequence, filled in place
    tokens[:, :length] = prompt.repeat(num_samples, 1)
    seen = None
    if controls.repetition_penalty != 1:
        seen = torch.zeros(rows, model.vocab_size, dtype=torch.bool, device=prompt.device)
        seen.scatter_(1, tokens[:, :length], True)
    cache, products = None, contextlib.nullcontext()
    if use_cache:
        total = length + max_new_tokens
        cache = model.new_cache(rows, total if without_end else min(block, total))
        if split_products and prompt.device.type == "cpu":
            products = step_products(model, rows)
    logits = forward_last(model, prompt, cache, 0).repeat(num_samples, 1, 1)
    if cache is not None:
        cache.repeat(prompt.size(0))
    start, end = 0, length  # the window is tokens[:, start:end]
    for step in range(max_new_tokens):
        token = next_token(logits[:, -1], controls, seen, generator)
        tokens[:, end] = token
        end += 1
        if seen is not None:
            seen.scatter_(1, token.unsqueeze(1), True)
        yield token
        if step + 1 == max_new_tokens:
            break
        if without_end:
            if cache is None:
                start = max(0, end - reach)
        elif end - start > block:
            start = end - keep
            if cache is not None:
                cache.reset()
        origin = 0 if without_end else start  # tokens[:, i] sits at position i - origin
        read = start + (cache.length if cache is not None else 0)
        logits = forward_last(model, tokens[:, read:end], cache, read - origin, products)


class IncrementalDecoder:
    """Turns one sample's token ids into text as they arrive, emitting only finished text: a
    character split across byte tokens is held until its last byte comes.

    It re-decodes a short span of recent ids and emits what grew, which also serves tokenizers
    whose text for a token depends on the one before (e.g. SentencePiece's leading spaces).
    """

    CONTEXT = 4  # prompt ids kept as context for the first new token

    def __init__(self, tokenizer, context=()):
        self.tokenizer = tokenizer
        self.ids = list(context)[-self.CONTEXT:]
        self.prefix = 0  # ids[prefix:read] is text already emitted, decoded again as context
        self.read = len(self.ids)

    def _grown(self):
        done = self.tokenizer.decode(self.ids[self.prefix:self.read])
        return self.tokenizer.decode(self.ids[self.prefix:])[len(done):]

    def push(self, token_id):
        """The text that token_id completes (often one character, sometimes none)."""
        self.ids.append(token_id)
        text = self._grown()
        if text.endswith("\ufffd"):  # an unfinished UTF-8 sequence; wait for its next byte
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text

    def flush(self):
        """What is still held at the end (an unfinished character shows as U+FFFD)."""
        text = self._grown()
        self.prefix = self.read = len(self.ids)
        return text


class StopFilter:
    """Passes text through until a stop string appears, withholding the stop string and
    everything after it. Text that could still grow into a stop string is held back, so a stop
    string split across tokens is caught before any of it is shown."""

    def __init__(self, stops=()):
        self.stops = [s for s in stops if s]
        self.held = ""
        self.stopped = False

    def push(self, text):
        """The part of text (with what was held) that is safe to show now."""
        if self.stopped:
            return ""
        self.held += text
        hits = [i for i in (self.held.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.held, self.stopped = self.held[:min(hits)], "", True
            return out
        keep = self._partial_stop_length()
        out, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
        return out

    def _partial_stop_length(self):
        """Length of the longest end of the held text that begins some stop string."""
        longest = max((len(s) for s in self.stops), default=1)
        for size in range(min(len(self.held), longest - 1), 0, -1):
            tail = self.held[-size:]
            if any(s.startswith(tail) for s in self.stops):
                return size
        return 0

    def flush(self):
        out, self.held = self.held, ""
        return out


@dataclass
class Sample:
    text: str = ""
    tokens: int = 0  # tokens generated for this sample, up to and including the one that ended it
    finish: str = "length"  # length (max_new_tokens reached), stop (a stop string) or eos


def complete(model, tokenizer, prompt_ids, max_new_tokens, controls=Controls(), *, num_samples=1,
             seed=0, stop=(), use_cache=True, compile=False, on_text=None):
    """Continue prompt_ids num_samples times in one batch (one forward pass a step for all).

    Returns a Sample per row. on_text(row, text) hears each piece of a row's text as soon as it
    is final: whole characters, stop strings withheld. A row ends at a stop string or the
    tokenizer's end-of-text token (`eos_id`, where it has one), neither of which is shown.
    With compile, the model runs under torch.compile (see `compiled`); compiling delays the
    first token.
    """
    device = next(model.parameters()).device
    if compile:
        model = compiled(model, dynamic=True)  # one graph for every prompt and cache length
    prompt = torch.tensor([prompt_ids], device=device)
    generator = torch.Generator(device).manual_seed(seed)
    eos_id = getattr(tokenizer, "eos_id", None)
    decoders = [IncrementalDecoder(tokenizer, prompt_ids) for _ in range(num_samples)]
    filters = [StopFilter(stop) for _ in range(num_samples)]
    samples = [Sample() for _ in range(num_samples)]
    live = set(range(num_samples))

    def show(row, text):
        if text:
            samples[row].text += text
            if on_text:
                on_text(row, text)

    def end(row, reason):
        live.discard(row)
        show(row, filters[row].push(decoders[row].flush()))  # what was held back, stops included
        show(row, filters[row].flush())
        samples[row].finish = "stop" if filters[row].stopped else reason

    for step in generate(model, prompt, max_new_tokens, controls, generator, use_cache,
                         num_samples, split_products=not compile):
        for row, token_id in enumerate(step.tolist()):
            if row not in live:
                continue
            samples[row].tokens += 1
            if token_id == eos_id:
                end(row, "eos")
                continue
            show(row, filters[row].push(decoders[row].push(token_id)))
            if filters[row].stopped:
                end(row, "stop")
        if not live:
            break
    for row in sorted(live):
        end(row, "length")
    return samples
