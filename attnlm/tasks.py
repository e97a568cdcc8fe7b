"""Synthetic long-range tasks as data sources, and their exact-match score.

A spec names a task and, after commas, its options: `synthetic:copy`,
`synthetic:reverse,length=24,vocab=10`, `synthetic:associative_recall,length=8,seed=3`
(commas, not `?` and `&`, so that a shell needs no quotes). Each example is one line: a context,
the separator `|`, then what the context determines:

    copy                 cabbda|cabbda      the string again
    reverse              cabbda|adbbac      the string backwards
    associative_recall   aDcAbB|cAbBaD      every key again, in a random order, each followed
                                            by the value it was paired with

Copying or reversing needs each answer symbol fetched from a fixed distance back; recall needs
the key found wherever it stands. A direct attention path does both in one step at any distance.
Recall asks every key (rather than one), so that each line teaches it `length` times.

A held-out example is a prompt and its answer: for copy and reverse, the context and separator,
then the whole string; for recall, the context, separator and first key, then its value. The
text is a function of the spec alone: `n` training lines drawn from `seed`. Held-out examples
come from another stream of the same seed, minus any whose context states what a training
line's does (the same string; for recall, the same pairs in any order), so they are unseen by
construction.
"""

import random
from dataclasses import dataclass

import torch

from attnlm.choices import suggest as _suggest
from attnlm.errors import InputError
from attnlm.sampling import Controls, generate

PREFIX = "synthetic:"
SEPARATOR = "|"
KEYS = "abcdefghijklmnopqrstuvwxyz"  # symbols of copy and reverse; keys of recall
VALUES = KEYS.upper()  # values of recall, apart from its keys
DEFAULTS = {  # copy and recall: >= 99% within minutes (recipes copy and associative_recall)
    "copy": {"length": 16, "vocab": 8},
    "reverse": {"length": 16, "vocab": 8},
    "associative_recall": {"length": 8, "vocab": 16},  # length: key-value pairs
}
COMMON = {"n": 20000, "seed": 0}  # training examples; the seed they are drawn from


@dataclass(frozen=True)
class Task:
    name: str
    length: int  # symbols to copy or reverse; key-value pairs to recall from
    vocab: int  # symbols (recall: keys, and as many values)
    n: int
    seed: int

    def example(self, rng):
        """(context, prompt, answer, line) drawn from rng: the line trains, the prompt and answer
        score."""
        if self.name == "associative_recall":
            keys = rng.sample(KEYS[: self.vocab], self.length)  # distinct: one value per key
            pairs = {k: rng.choice(VALUES[: self.vocab]) for k in keys}
            context = "".join(k + v for k, v in pairs.items())
            queries = rng.sample(keys, self.length)
            line = context + SEPARATOR + "".join(q + pairs[q] for q in queries)
            return context, context + SEPARATOR + queries[0], pairs[queries[0]], line
        context = "".join(rng.choice(KEYS[: self.vocab]) for _ in range(self.length))
        answer = context if self.name == "copy" else context[::-1]
        return context, context + SEPARATOR, answer, context + SEPARATOR + answer

    def training(self):
        rng = random.Random(self.seed)
        return [self.example(rng) for _ in range(self.n)]

    def text(self):
        return "".join(line + "\n" for *_, line in self.training())

    def facts(self, context):
        """What a context states, whatever its order: a recall context's set of pairs (a line
        with the same pairs in another order teaches the same answers), else the string."""
        if self.name == "associative_recall":
            return frozenset(zip(context[::2], context[1::2]))
        return context

    def heldout(self, count, trained=None):
        """count (prompt, answer) pairs whose contexts state what no training line's does, nor
        each other's: this task's training lines, and those of `trained` (the Task a model was
        trained on, where it is another variant)."""
        lines = self.training() + (trained.training() if trained else [])
        seen = {self.facts(context) for context, *_ in lines}
        rng = random.Random(f"heldout:{self.seed}")  # a string seed: its own stream, reproducible
        out = []
        for _ in range(100 * count):
            context, prompt, answer, _ = self.example(rng)
            if self.facts(context) not in seen:
                seen.add(self.facts(context))
                out.append((prompt, answer))
                if len(out) == count:
                    return out
        raise InputError(f"{self.name} with length={self.length}, vocab={self.vocab} has too few "
                         f"contexts beyond its {self.n} training lines to hold out {count}; raise "
                         "length or vocab, or lower n")

    def chance(self):
        """Exact match of guessing every answer symbol uniformly."""
        return 1 / self.vocab if self.name == "associative_recall" else self.vocab ** -self.length


def is_synthetic(spec):
    return spec.startswith(PREFIX)


def parse(spec):
    """The Task a `synthetic:NAME,key=value,...` spec names; InputError naming what is wrong."""
    name, *options = spec[len(PREFIX):].split(",")
    if name not in DEFAULTS:
        raise InputError(f"data.source={spec!r}: unknown task {name!r}{_suggest(name, DEFAULTS)}; "
                         f"choose {', '.join(DEFAULTS)}")
    values = {**DEFAULTS[name], **COMMON}
    for option in options:
        key, _, value = option.partition("=")
        if key not in values:
            raise InputError(f"data.source={spec!r}: unknown option {key!r}"
                             f"{_suggest(key, values)}; options: {', '.join(values)}")
        try:
            values[key] = int(value)
        except ValueError:
            raise InputError(f"data.source={spec!r}: {key} must be an integer, not {value!r}") from None
    task = Task(name, **values)
    problems = [
        (2 <= task.vocab <= len(KEYS), f"vocab={task.vocab} must be in [2, {len(KEYS)}]"),
        (task.length >= 1, f"length={task.length} must be positive"),
        (task.n >= 1, f"n={task.n} must be positive"),
        (name != "associative_recall" or task.length <= task.vocab,
         f"length={task.length} pairs need as many distinct keys: vocab must be at least that"),
    ]
    for ok, why in problems:
        if not ok:
            raise InputError(f"data.source={spec!r}: {why}")
    return task


def source_parts(spec):
    """The corpus parts of a synthetic source: its training text, generated."""
    return [parse(spec).text().encode("utf-8")]


START = "\n"  # every training example follows a newline, so a held-out prompt does too


def example_starts(tokens, tokenizer):
    """Where training windows start in a task's tokens: at the newline before each example, as
    exact-match prompts do (START). A window cut inside an example would train on answers whose
    question it lost, and teach guessing. None (windows start anywhere) where a newline is not
    one token, which exact match needs anyway."""
    newline = tokenizer.encode(START)
    return (tokens == newline[0]).nonzero().flatten() if len(newline) == 1 else None


def _context_needed(prompt_tokens, answer_tokens):
    return prompt_tokens + answer_tokens - 1  # the last answer token is predicted, never read


def check_fits(spec, block_size):
    """InputError unless a held-out example of the task (START, prompt and answer, one token a
    character as with the chars and bytes tokenizers) fits in block_size tokens of context."""
    _, prompt, answer, _ = parse(spec).example(random.Random(0))
    needed = _context_needed(len(START + prompt), len(answer))
    if needed > block_size:
        raise InputError(f"data.source={spec!r}: an example needs {needed} tokens of context; "
                         f"model.block_size={block_size} is too small")


@torch.no_grad()
def exact_match(model, tokenizer, examples, batch_size=256):
    """Fraction of (prompt, answer) examples whose answer greedy decoding produces from the prompt
    exactly. The examples of one task share their lengths, so they batch."""
    device = next(model.parameters()).device
    prompts = [tokenizer.encode(START + p) for p, _ in examples]
    answers = [tokenizer.encode(a) for _, a in examples]
    if len({len(p) for p in prompts}) > 1 or len({len(a) for a in answers}) > 1:
        raise InputError("exact match needs every prompt of a task to be as many tokens long; "
                         "use tokenizer.kind=chars or bytes")
    prompts, answers = torch.tensor(prompts, device=device), torch.tensor(answers, device=device)
    needed = _context_needed(prompts.size(1), answers.size(1))
    if needed > model.cfg.block_size:
        raise InputError(f"this task's examples need {needed} tokens of context; the model's "
                         f"block_size is {model.cfg.block_size}")
    was_training = model.training
    model.eval()
    right = 0
    for start in range(0, len(examples), batch_size):
        steps = generate(model, prompts[start : start + batch_size], answers.size(1),
                         Controls(temperature=0))
        generated = torch.stack(list(steps), dim=1)
        right += (generated == answers[start : start + batch_size]).all(dim=1).sum().item()
    model.train(was_training)
    return right / len(examples)


def evaluate(model, tokenizer, spec, count, trained_on=None):
    """Exact match on count held-out examples of a synthetic source, with chance for scale.
    trained_on: the run's own data.source; where it is another variant of the same task (another
    seed or n), its training lines are held out too."""
    task = parse(spec)
    trained = parse(trained_on) if trained_on and is_synthetic(trained_on) else None
    # Only another variant over the same contexts can share one: its own lines are held out
    # anyway, and another length or vocabulary makes other contexts altogether.
    shape = (task.name, task.length, task.vocab)
    if trained == task or (trained and (trained.name, trained.length, trained.vocab) != shape):
        trained = None
    return {"exact_match": exact_match(model, tokenizer, task.heldout(count, trained)),
            "examples": count, "chance": task.chance()}
