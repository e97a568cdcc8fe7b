"""Tokenizers (bytes, chars, SentencePiece bpe and unigram) behind one interface:
encode(text) -> ids, decode(ids) -> text, state() -> dict.

`state()` is plain data (JSON-able), saved beside the run and inside each checkpoint, so a
checkpoint alone rebuilds its tokenizer.
"""

import base64
import binascii
import io
import json
from pathlib import Path

import sentencepiece

from attnlm.choices import SENTENCEPIECE
from attnlm.errors import InputError
from attnlm.files import atomic_write


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


class SentencePieceTokenizer:
    """A SentencePiece model (BPE or unigram) that encodes any text and decodes it back exactly.

    SentencePiece normally rewrites text (Unicode normalization, merged spaces, a leading space
    added); attnlm trains without any of that and with byte fallback, so a character outside the
    vocabulary becomes its UTF-8 byte pieces. Lines are training sentences, so no piece holds a
    newline: a newline is always its own byte piece. A line longer than MAX_LINE characters is cut
    every MAX_LINE characters from its start, in training and encoding alike, and no piece spans
    such a cut either (see `independent_chunks`). One ambiguity is left: SentencePiece writes a
    space as U+2581 ('▁') and would read a literal U+2581 back as a space, so encode() writes
    that character as its three byte pieces.
    """

    # Text that a lossless model (ours, or a user's trained with the same options) round-trips.
    PROBE = "\ufeff two  spaces\n\n\ttab\r\n 🙂 東京 ▁ \x00\x7f end  "

    def __init__(self, kind, model_proto, name="the tokenizer model"):
        self.kind, self.model_proto = kind, model_proto
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_proto=model_proto)
        except RuntimeError:
            raise InputError(f"{name} is not a SentencePiece model") from None
        self.vocab_size = self.sp.get_piece_size()
        self.newline_ids = self.sp.encode("\n")
        self.space_mark_ids = [self.sp.piece_to_id(f"<0x{b:02X}>") for b in SPACE_MARK.encode()]
        if self.decode(self.encode(self.PROBE)) != self.PROBE:
            raise InputError(
                f"{name} does not round-trip text exactly; attnlm needs a model trained with "
                "--byte_fallback=true --normalization_rule_name=identity --add_dummy_prefix=false "
                "--remove_extra_whitespaces=false")

    @classmethod
    def train(cls, kind, vocab_size, texts):
        model = io.BytesIO()
        sentencepiece.set_random_generator_seed(0)  # the same text gives the same model
        try:
            sentencepiece.SentencePieceTrainer.train(
                sentence_iterator=_sentences(texts), model_writer=model, model_type=kind,
                vocab_size=vocab_size, byte_fallback=True, normalization_rule_name="identity",
                add_dummy_prefix=False, remove_extra_whitespaces=False,
                allow_whitespace_only_pieces=True,  # runs of spaces (code indentation) as pieces
                input_sentence_size=SAMPLE_LINES, shuffle_input_sentence=True, minloglevel=2)
        except RuntimeError as err:  # e.g. a vocabulary too small for the text's characters
            # Keep SentencePiece's reason, not its location nor its advice on flags attnlm hides.
            reason = str(err).split("] ", 1)[-1].split(" Increase vocab_size")[0].strip()
            raise InputError(f"cannot train a {kind} tokenizer with tokenizer.vocab_size="
                             f"{vocab_size} on this text: {reason}") from None
        return cls(kind, model.getvalue())

    @classmethod
    def from_file(cls, kind, path):
        try:
            with open(path, "rb") as f:
                return cls(kind, f.read(), name=str(path))
        except OSError as err:
            raise InputError(f"cannot read tokenizer.model_file={str(path)!r}: {err.strerror}") from None

    def encode(self, text):
        # Each line (each MAX_LINE cut of a long one) is encoded on its own, so a text's ids are
        # those of its lines however the text is cut into chunks. (Unigram breaks ties between
        # equally likely splits by float rounding, which the text before would otherwise sway.)
        pieces, before = [], []  # the pieces SentencePiece encodes; the ids that precede each
        for n, line in enumerate(text.split("\n")):
            for cut in range(0, max(len(line), 1), MAX_LINE):
                glue = self.newline_ids if n and not cut else []  # nothing before a cut
                for piece in line[cut : cut + MAX_LINE].split(SPACE_MARK):
                    pieces.append(piece)
                    before.append(glue)
                    glue = self.space_mark_ids
        ids = []
        for prefix, piece_ids in zip(before, self.sp.encode(pieces)):
            ids += prefix
            ids += piece_ids
        return ids

    def decode(self, ids):
        # Byte pieces of a character cut short decode to U+FFFD, as for ByteTokenizer.
        return self.sp.decode(list(ids))

    def state(self):
        return {"kind": self.kind, "model": base64.b64encode(self.model_proto).decode("ascii")}


SPACE_MARK = "\u2581"  # SentencePiece's stand-in for a space
SAMPLE_LINES = 300_000  # lines drawn at random from the training text to train a tokenizer on
MAX_LINE = 1000  # characters; longer lines are cut (SentencePiece skips sentences over 4192 bytes)


def independent_chunks(texts):
    """A stream of text chunks re-cut where no token of any tokenizer here spans: after a newline,
    or at a MAX_LINE cut of a long line. Encoding these one by one gives the ids of the whole
    text, and a line with no end in sight never sits whole in memory."""
    carry = ""  # the start of a line, or of its latest MAX_LINE cut
    for text in texts:
        text = carry + text
        cut = text.rfind("\n") + 1
        cut += (len(text) - cut) // MAX_LINE * MAX_LINE  # whole cuts of the unfinished line
        if cut:
            yield text[:cut]
        carry = text[cut:]
    if carry:
        yield carry


def _sentences(texts):
    """The lines of a stream of text chunks, without their newlines, long ones cut."""
    for chunk in independent_chunks(texts):
        for line in chunk.split("\n"):
            yield from (line[i : i + MAX_LINE] for i in range(0, len(line), MAX_LINE))


def learning_end(kind, train_end, total):
    """Where the text a tokenizer learns from ends: a subword tokenizer learns from the train
    split alone (train_end), so that val is text it has not seen; a character vocabulary covers
    the whole source (total), so that val holds no character it cannot encode."""
    return total if kind == "chars" else train_end


def train_tokenizer(cfg, texts):
    """Build the tokenizer that `cfg` (TokenizerConfig) asks for from an iterable of texts."""
    if cfg.kind == "chars":
        return CharTokenizer.train(texts)
    if cfg.kind == "hf":
        from attnlm.hf_tokenizer import HFTokenizer

        return HFTokenizer.from_path(cfg.model_file)
    if cfg.kind in SENTENCEPIECE and cfg.model_file:
        return SentencePieceTokenizer.from_file(cfg.kind, cfg.model_file)
    if cfg.kind in SENTENCEPIECE:
        return SentencePieceTokenizer.train(cfg.kind, cfg.vocab_size, texts)
    return ByteTokenizer()


def from_state(state):
    kind = state.get("kind") if isinstance(state, dict) else None
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "chars" and isinstance(state.get("chars"), str):
        return CharTokenizer(state["chars"])
    if kind in SENTENCEPIECE and isinstance(state.get("model"), str):
        try:
            model = base64.b64decode(state["model"], validate=True)
        except binascii.Error:
            raise InputError(f"the saved {kind} tokenizer model is not valid base64") from None
        return SentencePieceTokenizer(kind, model)
    if kind == "hf":
        from attnlm import hf_tokenizer

        return hf_tokenizer.from_state(state)
    raise InputError(f"unknown tokenizer state (kind={kind!r})")


def save(tokenizer, path):
    """The state as JSON at path; a SentencePiece model also as a .model file beside it, which
    other tools (and tokenizer.model_file) read."""
    atomic_write(path, json.dumps(tokenizer.state(), ensure_ascii=False))
    if isinstance(tokenizer, SentencePieceTokenizer):
        atomic_write(Path(path).with_suffix(".model"), tokenizer.model_proto)


def load(path):
    try:
        with open(path, encoding="utf-8") as f:
            return from_state(json.load(f))
    except (OSError, ValueError) as err:
        raise InputError(f"cannot read tokenizer {path}: {err}") from None
