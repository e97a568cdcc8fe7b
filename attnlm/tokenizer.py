"""Tokenizers behind one interface: encode(text) -> ids, decode(ids) -> text, state() -> dict.

`state()` is plain data (JSON-able), saved beside the run and inside each checkpoint, so a
checkpoint alone rebuilds its tokenizer.
"""

import json

from attnlm.errors import InputError


class ByteTokenizer:
    """UTF-8 bytes: vocabulary 256, every text encodable."""

    kind = "bytes"
    vocab_size = 256

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        # A sample may end inside a multi-byte character; show it as U+FFFD rather than fail.
        return bytes(ids).decode("utf-8", errors="replace")

    def state(self):
        return {"kind": self.kind}


class CharTokenizer:
    """One id per character of the source text (train and val splits), in code-point order.

    A character outside that vocabulary cannot be encoded: encode() raises an InputError that
    names it, rather than guessing a substitute.
    """

    kind = "chars"

    def __init__(self, chars):
        self.chars = sorted(set(chars))
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self.vocab_size = len(self.chars)

    @classmethod
    def train(cls, texts):
        seen = set()
        for text in texts:
            seen.update(text)
        if not seen:
            raise InputError("cannot build a character vocabulary from empty text")
        return cls(seen)

    def encode(self, text):
        try:
            return [self.stoi[c] for c in text]
        except KeyError:
            missing = sorted(set(text) - self.stoi.keys())
            shown = ", ".join(f"{c!r} (U+{ord(c):04X})" for c in missing[:5])
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise InputError(f"text has characters not in the vocabulary: {shown}{more}") from None

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids)

    def state(self):
        return {"kind": self.kind, "chars": "".join(self.chars)}


KINDS = ("bytes", "chars")


def train_tokenizer(cfg, texts):
    """Build the tokenizer that `cfg` (TokenizerConfig) asks for from an iterable of texts."""
    if cfg.kind == "chars":
        return CharTokenizer.train(texts)
    return ByteTokenizer()


def from_state(state):
    kind = state.get("kind") if isinstance(state, dict) else None
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "chars" and isinstance(state.get("chars"), str):
        return CharTokenizer(state["chars"])
    raise InputError(f"unknown tokenizer state (kind={kind!r})")


def save(tokenizer, path):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(tokenizer.state(), f, ensure_ascii=False)


def load(path):
    try:
        with open(path, encoding="utf-8") as f:
            return from_state(json.load(f))
    except (OSError, ValueError) as err:
        raise InputError(f"cannot read tokenizer {path}: {err}") from None
