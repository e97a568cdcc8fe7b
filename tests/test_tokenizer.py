import base64
import functools
import json
import math

import pytest
import sentencepiece
from hypothesis import given, settings, strategies as st
from pydoc_data.topics import topics

from attnlm import checkpoint, run as run_mod
from attnlm import tokenizer as tok
from attnlm.config import TokenizerConfig, build_config
from attnlm.errors import ConfigError, InputError

SAMPLES = ["", "hello world", "naïve café — 東京 🙂\n\ttabs", "\ufeffBOM and \x00 control \x7f"]


@pytest.mark.parametrize("text", SAMPLES)
def test_bytes_round_trip(text):
    t = tok.ByteTokenizer()
    ids = t.encode(text)
    assert ids == list(text.encode("utf-8")) and all(0 <= i < 256 for i in ids)
    assert t.decode(ids) == text


def test_bytes_decode_of_a_cut_character_is_replaced_not_fatal():
    ids = tok.ByteTokenizer().encode("é")[:1]
    assert tok.ByteTokenizer().decode(ids) == "\ufffd"


def test_chars_vocab_and_round_trip():
    t = tok.train_tokenizer(TokenizerConfig(kind="chars"), ["hello ", "wörld"])
    assert t.vocab_size == len(set("hello wörld"))
    assert t.chars == sorted(set("hello wörld"))  # code-point order
    assert t.decode(t.encode("world hello")) == "world hello"
    assert t.encode("de") == [t.chars.index("d"), t.chars.index("e")]


def test_chars_unknown_character_is_a_clear_input_error():
    t = tok.CharTokenizer("abc")
    with pytest.raises(InputError, match=r"not in the vocabulary: 'z' \(U\+007A\)"):
        t.encode("abz")


def test_chars_from_empty_text_is_an_error():
    with pytest.raises(InputError, match="empty text"):
        tok.train_tokenizer(TokenizerConfig(kind="chars"), [""])


@pytest.mark.parametrize("t", [tok.ByteTokenizer(), tok.CharTokenizer("xyz\n")])
def test_state_save_load_round_trip(t, tmp_path):
    tok.save(t, tmp_path / "tok.json")
    loaded = tok.load(tmp_path / "tok.json")
    assert loaded.state() == t.state() and loaded.vocab_size == t.vocab_size
    assert tok.from_state(t.state()).encode("xyz") == t.encode("xyz")


def test_unknown_state_is_rejected():
    with pytest.raises(InputError, match="unknown tokenizer"):
        tok.from_state({"kind": "wordpiece"})


# SentencePiece (bpe, unigram), trained once per session on a small English text.

CORPUS = "\n\n".join(topics[k] for k in sorted(topics))[:60_000]  # Python's reference, in English
HARD = SAMPLES + [
    "\u2581 a literal U+2581 \u2581\u2581, not a space",
    "  leading and trailing spaces  ", "\n\n\nblank lines\r\nCRLF\r\n", "\t\tindented\n    code",
    "Ελληνικά русский العربية हिन्दी 한국어 ไทย", "👨‍👩‍👧 family, flag 🇫🇷, skin 👍🏽", "\x1b[31mred\x1b[0m \x07\x08",
    "\ufffd replacement \U0010ffff last code point", "the quick brown fox " * 200,
    "first\n" + "the quick brown fox " * 200,  # a line cut into pieces after a newline
]


@functools.cache
def trained(kind):
    return tok.SentencePieceTokenizer.train(kind, 400, [CORPUS])


@pytest.fixture(params=["bpe", "unigram"])
def subword(request):
    return trained(request.param)


def pieces_text(t, ids):
    """The text that ids stand for, read from the pieces themselves (not through decode)."""
    out = b""
    for i in ids:
        piece = t.sp.id_to_piece(i)
        out += bytes([int(piece[3:5], 16)]) if t.sp.is_byte(i) else piece.replace("\u2581", " ").encode()
    return out.decode("utf-8")


@pytest.mark.parametrize("text", HARD)
def test_subword_round_trip_is_exact(subword, text):
    ids = subword.encode(text)
    assert all(0 <= i < subword.vocab_size for i in ids)
    assert pieces_text(subword, ids) == text
    assert subword.decode(ids) == text


@settings(max_examples=200, deadline=None)
@given(text=st.text(st.one_of(st.characters(codec="utf-8"), st.sampled_from(" \n\r\t\u2581\ufeff")), max_size=80))
def test_subword_round_trip_of_any_text(text):
    for kind in ["bpe", "unigram"]:
        assert trained(kind).decode(trained(kind).encode(text)) == text


def test_subword_learns_pieces_but_never_across_a_newline(subword):
    assert subword.vocab_size == 400
    assert len(subword.encode(CORPUS)) < len(CORPUS.encode("utf-8")) / 1.4  # it does compress
    pieces = [subword.sp.id_to_piece(i) for i in range(subword.vocab_size)]
    assert "\u2581the" in pieces
    assert not any("\n" in p for p in pieces)
    assert subword.encode("\n") == [pieces.index("<0x0A>")]


def test_subword_training_is_deterministic(subword):
    again = tok.SentencePieceTokenizer.train(subword.kind, 400, [CORPUS[:5000], CORPUS[5000:]])
    assert again.state() == subword.state()


def test_subword_state_json_model_file_and_checkpoint(subword, tmp_path):
    tok.save(subword, tmp_path / "tokenizer.json")
    assert (tmp_path / "tokenizer.model").read_bytes() == subword.model_proto
    assert json.loads((tmp_path / "tokenizer.json").read_text())["kind"] == subword.kind
    text = HARD[-4]
    from_json = tok.load(tmp_path / "tokenizer.json")
    assert from_json.state() == subword.state() and from_json.encode(text) == subword.encode(text)
    # The .model beside it is a user's own model file: the same tokenizer, no training.
    cfg = TokenizerConfig(kind=subword.kind, model_file=str(tmp_path / "tokenizer.model"))
    reused = tok.train_tokenizer(cfg, iter(()))
    assert reused.encode(text) == subword.encode(text)
    # A checkpoint holds the state and is read back with weights_only.
    checkpoint.save({"tokenizer": subword.state()}, tmp_path / "c.pt")
    loaded = tok.from_state(checkpoint.load(tmp_path / "c.pt")["tokenizer"])
    assert loaded.encode(text) == subword.encode(text)


def test_lossy_user_model_is_refused(tmp_path):
    """A model with SentencePiece's default normalization would change text; refuse it."""
    path = tmp_path / "lossy.model"
    with open(path, "wb") as f:
        sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS.splitlines()),
                                                 model_writer=f, vocab_size=300, minloglevel=2)
    with pytest.raises(InputError, match="does not round-trip text exactly"):
        tok.SentencePieceTokenizer.from_file("unigram", path)


def test_bad_model_files_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="cannot read tokenizer.model_file"):
        tok.SentencePieceTokenizer.from_file("bpe", tmp_path / "missing.model")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(InputError, match="junk.model is not a SentencePiece model"):
        tok.SentencePieceTokenizer.from_file("bpe", tmp_path / "junk.model")
    with pytest.raises(InputError, match="not valid base64"):
        tok.from_state({"kind": "bpe", "model": "#!"})
    bad = {"kind": "unigram", "model": base64.b64encode(b"junk").decode()}
    with pytest.raises(InputError, match="not a SentencePiece model"):
        tok.from_state(bad)


def test_vocabulary_too_small_for_the_text_is_an_input_error():
    text = "".join(chr(0x4E00 + i) for i in range(300))  # 300 distinct CJK characters
    with pytest.raises(InputError, match=r"tokenizer.vocab_size=400 on this text: Vocabulary "
                                         r"size is smaller than required_chars\. 400 vs \d+\.$"):
        tok.SentencePieceTokenizer.train("bpe", 400, [text * 3])


def test_tokenizer_config_checks():
    with pytest.raises(ConfigError, match=r"tokenizer.vocab_size=100 must be at least 260"):
        build_config(overrides=["tokenizer.kind=bpe", "tokenizer.vocab_size=100"])
    with pytest.raises(ConfigError, match=r"tokenizer.model_file='x.model' needs tokenizer.kind"):
        build_config(overrides=["tokenizer.kind=chars", "tokenizer.model_file=x.model"])
    build_config(overrides=["tokenizer.kind=bytes", "tokenizer.vocab_size=100"])  # unused: fine
    build_config(overrides=["tokenizer.kind=unigram", "tokenizer.model_file=x.model",
                            "tokenizer.vocab_size=1"])  # the model file decides


def test_training_sentences_are_lines_joined_across_chunks_and_cut(monkeypatch):
    monkeypatch.setattr(tok, "MAX_LINE", 4)
    chunks = ["ab\ncd", "e\n\nfghijkl", "mn", "o\nxy"]
    assert list(tok._sentences(chunks)) == ["ab", "cde", "fghi", "jklm", "no", "xy"]


def test_a_subword_run_keeps_its_tokenizer_for_eval_and_generate(tmp_path):
    """Trained with bpe, the run directory and checkpoint carry the tokenizer: eval and generate
    use it without being told, and eval's bits per byte is over the val text's bytes."""
    from click.testing import CliRunner

    from attnlm.cli import cli
    from attnlm.train import train
    from tests.helpers import text_file, tiny_config

    cfg = tiny_config(text_file(tmp_path, CORPUS), "tokenizer.kind=bpe", "tokenizer.vocab_size=400",
                      "train.max_iters=4")
    train(cfg, tmp_path / "run", quiet=True)
    saved = tok.load(tmp_path / "run" / "tokenizer.json")
    assert saved.kind == "bpe" and saved.vocab_size == 400
    assert (tmp_path / "run" / "tokenizer.model").read_bytes() == saved.model_proto
    _, loaded, _, _ = run_mod.load_model(tmp_path / "run")
    assert loaded.state() == saved.state()

    result = CliRunner().invoke(cli, ["eval", str(tmp_path / "run"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    val_bytes = len(CORPUS.encode()) - int(len(CORPUS.encode()) * 0.9)
    assert report["bytes"] == val_bytes and report["tokens"] < val_bytes / 1.4
    assert report["bits_per_byte"] == pytest.approx(
        report["loss"] * report["tokens"] / (val_bytes * math.log(2)))

    result = CliRunner().invoke(cli, ["generate", str(tmp_path / "run"), "--prompt", "The ",
                                      "--max-new-tokens", "5", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["samples"][0]["tokens"] == 5
