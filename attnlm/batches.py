"""Batches from a split of tokens: x is a window of block_size tokens, y the same shifted by one.

Training draws random windows (BatchSampler); evaluating a whole split reads every window once
(`windows`). Where a split has `starts` (a synthetic task's examples), both use windows that
start there and nowhere else, so the val loss that training samples and the one `eval` computes
over the whole split are one quantity: the mean loss of windows starting at examples.
"""

from dataclasses import dataclass

import torch

from attnlm.errors import InputError


@dataclass
class Split:
    tokens: torch.Tensor  # 1-D, memory-mapped, small unsigned integers
    n_bytes: int  # UTF-8 bytes of the text it encodes (for bits per byte)
    starts: torch.Tensor | None = None  # offsets a window may start at; None: any
    sha256: str = ""  # of the token file, as the token cache verified it

    def __len__(self):
        return len(self.tokens)

    @property
    def tokens_per_byte(self):
        """What turns a loss per token into one per byte, the same whatever the tokenizer."""
        return len(self.tokens) / self.n_bytes


def window_starts(split, block_size, name="this"):
    """The split's starts that leave room for a window of block_size + 1 tokens, or None where
    windows may start anywhere."""
    if split.starts is None:
        return None
    starts = split.starts[split.starts < len(split.tokens) - block_size]
    if not len(starts):
        raise InputError(f"{name} split has no example followed by {block_size + 1} tokens; "
                         "use more examples, a smaller block_size or val_fraction")
    return starts


def need_tokens(split, name, block_size):
    if len(split) < block_size + 1:
        raise InputError(
            f"the {name} split has {len(split)} tokens; model.block_size={block_size} needs at "
            f"least {block_size + 1} (use more text, a smaller block_size or val_fraction)"
        )
    window_starts(split, block_size, f"the {name}")


class BatchSampler:
    """Random windows of block_size + 1 tokens; x is a window, y the same shifted by one. They
    start anywhere, or only at the split's `starts` where it has them."""

    def __init__(self, split, block_size, batch_size, seed, device="cpu"):
        self.tokens, self.block_size, self.batch_size = split.tokens, block_size, batch_size
        self.starts = window_starts(split, block_size)
        self.device = torch.device(device)
        self.generator = torch.Generator().manual_seed(seed)
        self.window = torch.arange(block_size + 1)

    def draw(self, count):
        """The starts of the next count windows of the stream. Drawing 2n at once gives the
        starts that two draws of n give, so a step's windows are the same however a job splits
        them into micro-batches and processes."""
        if self.starts is None:
            return torch.randint(len(self.tokens) - self.block_size, (count,), generator=self.generator)
        return self.starts[torch.randint(len(self.starts), (count,), generator=self.generator)]

    def windows_at(self, starts):
        """(x, y) for the windows at `starts`."""
        chunk = self.tokens[starts.unsqueeze(1) + self.window].long()
        if self.device.type == "cuda":
            chunk = chunk.pin_memory().to(self.device, non_blocking=True)
        return chunk[:, :-1], chunk[:, 1:]

    def next(self):
        return self.windows_at(self.draw(self.batch_size))

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])


def windows(split, block_size, batch_size):
    """All of a split in batches: a window at each of its starts where it has them (the windows
    BatchSampler draws from); otherwise every token predicted exactly once, by consecutive windows
    overlapping by one, full ones batched, a shorter last one alone."""
    starts = window_starts(split, block_size)
    if starts is not None:
        for i in range(0, len(starts), batch_size):
            yield _stack(split.tokens, starts[i : i + batch_size], block_size)
        return
    n = len(split.tokens) - 1  # predictions to make
    full = list(range(0, n - block_size + 1, block_size))
    for i in range(0, len(full), batch_size):
        yield _stack(split.tokens, full[i : i + batch_size], block_size)
    if n % block_size:
        yield _stack(split.tokens, [n - n % block_size], n % block_size)


def _stack(tokens, starts, length):
    idx = torch.as_tensor(starts).unsqueeze(1) + torch.arange(length + 1)
    chunk = tokens[idx].long()
    return chunk[:, :-1], chunk[:, 1:]
