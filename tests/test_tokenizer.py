import pytest

from attnlm import tokenizer as tok
from attnlm.config import TokenizerConfig
from attnlm.errors import InputError

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
