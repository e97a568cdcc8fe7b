"""Hugging Face tokenizers in attnlm and attnlm's tokenizers for Hugging Face.

`HFTokenizer` is the tokenizer kind `hf`: a `tokenizers` tokenizer (a tokenizer.json) behind
attnlm's interface, as an imported model brings it. `to_hf` writes an attnlm tokenizer as a
tokenizer.json that gives the same ids, where one can: bytes, chars and SentencePiece bpe and
unigram. Needs the optional extra: pip install 'attnlm[hf]'.
"""

import importlib
import json
from pathlib import Path

from attnlm.choices import SENTENCEPIECE
from attnlm.errors import AttnlmError, InputError

INSTALL = "pip install 'attnlm[hf]'"
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")  # one of them, at least


def require(module):
    """Import one of the hf extra's packages, or say what to install (exit 1: environment)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise AttnlmError(f"this needs the {module} package: {INSTALL}") from None


class HFTokenizer:
    """A Hugging Face tokenizer: ids as transformers' tokenizer gives them for plain text (no
    special tokens added), text as it decodes them. eos_id ends a generated sample."""

    kind = "hf"

    def __init__(self, json_text, eos_id=None, name="the tokenizer"):
        tokenizers = require("tokenizers")
        try:
            self.tokenizer = tokenizers.Tokenizer.from_str(json_text)
        except Exception:  # tokenizers raises its own exception types for a bad file
            raise InputError(f"{name} is not a Hugging Face tokenizer.json") from None
        self.json_text, self.eos_id = json_text, eos_id
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_path(cls, path):
        """From a tokenizer.json file, or a directory of tokenizer files (read by transformers'
        AutoTokenizer from that directory alone; no code in it runs)."""
        path = Path(path)
        if path.is_file():
            return cls(path.read_text(encoding="utf-8"), name=str(path))
        if not path.is_dir():
            raise InputError(f"{path}: no such tokenizer file or directory")
        if not any((path / name).is_file() for name in TOKENIZER_FILES):
            raise InputError(f"{path} holds no tokenizer files ({', '.join(TOKENIZER_FILES)})")
        transformers = require("transformers")
        transformers.logging.set_verbosity_error()  # its notes on the model's config are not ours
        try:
            found = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as err:
            raise InputError(f"{path} holds no tokenizer transformers can read ({err})") from None
        if not getattr(found, "is_fast", False):
            raise InputError(f"{path}: its tokenizer has no tokenizers (fast) form")
        return cls(found.backend_tokenizer.to_str(), found.eos_token_id, name=str(path))

    def encode(self, text):
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def state(self):
        return {"kind": self.kind, "tokenizer": self.json_text, "eos_id": self.eos_id}


def from_state(state):
    eos_id = state.get("eos_id")
    if not isinstance(state.get("tokenizer"), str) or not isinstance(eos_id, (int, type(None))):
        raise InputError("the saved hf tokenizer state is damaged")
    return HFTokenizer(state["tokenizer"], eos_id)


def _bytes_to_unicode():
    """GPT-2's printable stand-in for each byte (the ByteLevel pre-tokenizer's): printable
    Latin-1 bytes stand for themselves, the others for code points from 256 up, in order."""
    kept = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in kept]
    return {**{b: chr(b) for b in kept}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def _each_character(tokenizers):
    return tokenizers.pre_tokenizers.Split(tokenizers.Regex(r"[\s\S]"), "isolated")


def _bytes(tokenizer, t):
    stand_in = _bytes_to_unicode()
    model = t.models.WordLevel({stand_in[b]: b for b in range(256)}, unk_token="<unk>")
    hf = t.Tokenizer(model)
    hf.pre_tokenizer = t.pre_tokenizers.Sequence([
        t.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False), _each_character(t)])
    hf.decoder = t.decoders.ByteLevel()
    return hf


def _chars(tokenizer, t):
    # A character outside the vocabulary is an error there as here (no <unk> in the vocabulary).
    hf = t.Tokenizer(t.models.WordLevel(dict(tokenizer.stoi), unk_token="<unk>"))
    hf.pre_tokenizer = _each_character(t)
    hf.decoder = t.decoders.Fuse()
    return hf


NEVER = -1e9  # the score of pieces that only stand for something (control, byte): never matched


def _sentencepiece(tokenizer, t):
    """SentencePiece's model as tokenizers' Unigram or BPE, cut into lines and MAX_LINE
    pieces as SentencePieceTokenizer.encode cuts them, spaces written as U+2581."""
    from attnlm.tokenizer import MAX_LINE, SPACE_MARK

    sp = tokenizer.sp
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    plain = [not (sp.is_control(i) or sp.is_byte(i) or sp.is_unknown(i)) for i in range(len(pieces))]
    unk = next(i for i in range(len(pieces)) if sp.is_unknown(i))
    if tokenizer.kind == "unigram":
        scores = [sp.get_score(i) if plain[i] else NEVER for i in range(len(pieces))]
        model = t.models.Unigram(list(zip(pieces, scores)), unk_id=unk, byte_fallback=True)
    else:
        # SentencePiece merges the adjacent pair whose union is the likeliest piece: as ranked
        # merges, every split of each piece in the order of the pieces' scores.
        vocab = {p: i for i, p in enumerate(pieces)}
        known = {p for p, ok in zip(pieces, plain) if ok}
        ranked = sorted((i for i in range(len(pieces)) if plain[i]), key=lambda i: -sp.get_score(i))
        merges = [(pieces[i][:k], pieces[i][k:]) for i in ranked for k in range(1, len(pieces[i]))
                  if pieces[i][:k] in known and pieces[i][k:] in known]
        model = t.models.BPE(vocab, merges, unk_token=pieces[unk], byte_fallback=True)
    hf = t.Tokenizer(model)
    hf.pre_tokenizer = t.pre_tokenizers.Sequence([
        t.pre_tokenizers.Split(t.Regex(f"[^\\n]{{1,{MAX_LINE}}}"), "isolated"),
        t.pre_tokenizers.Metaspace(replacement=SPACE_MARK, prepend_scheme="never", split=False)])
    hf.decoder = t.decoders.Sequence([t.decoders.Replace(SPACE_MARK, " "),
                                      t.decoders.ByteFallback(), t.decoders.Fuse()])
    return hf


CONVERTERS = {"bytes": _bytes, "chars": _chars, "bpe": _sentencepiece, "unigram": _sentencepiece}
SPACE_MARK_LIMIT = ("text holding U+2581 ('▁') itself encodes otherwise there (SentencePiece "
                    "reads it as a space; attnlm writes it as its bytes)")
LIMITS = {"bpe": SPACE_MARK_LIMIT,  # said at export
          "unigram": SPACE_MARK_LIMIT + "; and where two splits score the same (a long run of one "
                     "character), SentencePiece's float32 sums choose, which tokenizers' float64 "
                     "sums cannot follow"}


def to_hf(tokenizer):
    """The tokenizer as a tokenizer.json text that transformers loads and that gives the same
    ids for the same text (see LIMITS)."""
    if tokenizer.kind == "hf":
        return tokenizer.json_text
    return CONVERTERS[tokenizer.kind](tokenizer, require("tokenizers")).to_str()


def tokenizer_config(tokenizer, block_size):
    """tokenizer_config.json: the fast tokenizer class, no special tokens added to text (attnlm
    adds none), and the special tokens the tokenizer has, where tools look for them
    (lm-evaluation-harness pads with one and starts texts with another)."""
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": block_size,
              "add_bos_token": False, "add_eos_token": False}
    eos_id = getattr(tokenizer, "eos_id", None)
    if eos_id is not None:
        config["eos_token"] = tokenizer.decode([eos_id])
    if tokenizer.kind in SENTENCEPIECE:
        # attnlm encodes text that spells a special piece ('</s>') as text: split_special_tokens
        sp = tokenizer.sp
        config |= {"bos_token": sp.id_to_piece(sp.bos_id()), "eos_token": sp.id_to_piece(sp.eos_id()),
                   "unk_token": sp.id_to_piece(sp.unk_id()), "pad_token": sp.id_to_piece(sp.unk_id()),
                   "split_special_tokens": True}
    return json.dumps(config, indent=2, ensure_ascii=False)
