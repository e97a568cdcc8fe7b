import os
from pathlib import Path

import pytest
import torch
from pydoc_data.topics import topics

from attnlm import data, sources
from attnlm.config import TokenizerConfig, build_config
from attnlm.tokenizer import MAX_LINE, ByteTokenizer, CharTokenizer, train_tokenizer
from tests.helpers import write


def test_token_files_cached_by_content_and_tokenizer(tmp_path):
    path = write(tmp_path / "t.txt", "abcdefghij" * 100)
    cfg = build_config(overrides=[f"data.source={path}", f"data.cache_dir={tmp_path / 'cache'}"])
    tok, splits = data.prepare_training(cfg)
    assert len(splits["train"]) == 900 and len(splits["val"]) == 100
    assert splits["train"].tokens.dtype == torch.uint16
    assert tok.decode(splits["val"].tokens.tolist()) == "abcdefghij" * 10
    entries = sorted(os.listdir(tmp_path / "cache"))
    # The same source and tokenizer reuse the entry (the files are not rewritten)...
    stamp = os.stat(tmp_path / "cache" / entries[0]).st_mtime_ns
    data.prepare_training(cfg, tok)
    assert sorted(os.listdir(tmp_path / "cache")) == entries
    assert os.stat(tmp_path / "cache" / entries[0]).st_mtime_ns == stamp
    # ...a different tokenizer or changed text makes a new one.
    data.prepare_training(cfg, ByteTokenizer())
    assert len(os.listdir(tmp_path / "cache")) == 2 * len(entries)
    write(path, "abcdefghij" * 99 + "abcdefghiX")
    tok2, splits2 = data.prepare_training(cfg)
    assert tok2.decode(splits2["val"].tokens[-1:].tolist()) == "X"

def test_char_vocab_sees_val_text(tmp_path):
    """The character vocabulary is built from the whole source, so val never holds unknowns."""
    path = write(tmp_path / "t.txt", "a" * 90 + "z" * 10)
    cfg = build_config(overrides=[f"data.source={path}"])
    tok, _ = data.prepare_training(cfg)
    assert isinstance(tok, CharTokenizer) and tok.chars == ["a", "z"]


ENGLISH = "\n\n".join(topics[k] for k in sorted(topics))[:30_000]  # Python's reference


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_subword_tokenizer_never_sees_val_text(tmp_path, kind):
    """The val split repeats Greek words, and train has no Greek: had the tokenizer seen val,
    'ζέβρα' would be a piece, or at least its letters characters of the vocabulary."""
    val = "ζέβρα Ζανζιβάρ " * 400
    path = write(tmp_path / "t.txt", ENGLISH + val)
    fraction = len(val.encode()) / len((ENGLISH + val).encode())  # the split is in bytes
    cfg = build_config(overrides=[f"data.source={path}", f"tokenizer.kind={kind}",
                                  "tokenizer.vocab_size=400", f"data.val_fraction={fraction}"])
    tok, splits = data.prepare_training(cfg)
    pieces = [tok.sp.id_to_piece(i) for i in range(tok.vocab_size)]
    assert not any(c in p for p in pieces for c in "ζέβραΖνιά")
    assert tok.decode(splits["val"].tokens.tolist()).endswith(val)  # byte fallback encodes it


@pytest.mark.parametrize("kind", ["bytes", "chars", "bpe", "unigram"])
def test_chunked_encoding_equals_whole_text_encoding(tmp_path, monkeypatch, kind):
    monkeypatch.setattr(sources, "CHUNK", 97)  # chunk edges fall inside words and characters
    long_line = ENGLISH[:5000].replace("\n", " ")  # cut every MAX_LINE characters
    text = ENGLISH.replace("the", "thé 🦊") + long_line + "\n" + long_line + "no newline at the end"
    path = write(tmp_path / "t.txt", text)
    cfg = build_config(overrides=[f"data.source={path}", f"tokenizer.kind={kind}",
                                  "tokenizer.vocab_size=400"])
    tok, splits = data.prepare_training(cfg)
    cut = sources.split_point(sources.resolve_source(str(path)), cfg.data.val_fraction)
    train_text, val_text = text.encode()[:cut].decode(), text.encode()[cut:].decode()
    assert splits["train"].tokens.tolist() == tok.encode(train_text)
    assert splits["val"].tokens.tolist() == tok.encode(val_text)


@pytest.mark.parametrize("kind", ["chars", "bpe"])
def test_a_line_without_end_is_encoded_in_bounded_pieces(tmp_path, monkeypatch, kind):
    """A file without newlines never sits whole in memory: the tokenizer sees pieces of at most
    MAX_LINE characters plus a chunk, and the ids are still those of the whole text."""
    text = ENGLISH.replace("\n", " ")
    path = write(tmp_path / "t.txt", text)
    tok = train_tokenizer(TokenizerConfig(kind=kind, vocab_size=400), [text])
    whole, encode, seen = tok.encode(text), tok.encode, []

    def spy(piece):
        seen.append(len(piece))
        return encode(piece)

    monkeypatch.setattr(tok, "encode", spy)
    monkeypatch.setattr(sources, "CHUNK", 500)
    assert data.prepare_source(str(path), tok).tokens.tolist() == whole
    assert len(seen) > 1 and max(seen) <= MAX_LINE + 500


@pytest.mark.parametrize("kind", ["bytes", "chars", "bpe", "unigram"])
def test_windows_line_endings_are_text_like_any_other(tmp_path, kind):
    """CRLF text: '\r' is a token (or part of one) like any character, kept and decoded back."""
    text = ENGLISH[:20_000].replace("\n", "\r\n")
    path = write(tmp_path / "t.txt", text)
    cfg = build_config(overrides=[f"data.source={path}", f"tokenizer.kind={kind}",
                                  "tokenizer.vocab_size=400"])
    tok, splits = data.prepare_training(cfg)
    assert tok.decode(splits["train"].tokens.tolist()) + tok.decode(splits["val"].tokens.tolist()) == text
    assert tok.encode("\r\n") and tok.decode(tok.encode("a\r\nb")) == "a\r\nb"


class WideTokenizer:
    """A stub with a large vocabulary: each character's code point, plus an offset."""

    kind = "wide"

    def __init__(self, vocab_size, offset):
        self.vocab_size, self.offset = vocab_size, offset

    def encode(self, text):
        return [ord(c) + self.offset for c in text]

    def state(self):
        return {"kind": self.kind, "vocab_size": self.vocab_size, "offset": self.offset}


@pytest.mark.parametrize("vocab_size, dtype", [(65_536, torch.uint16), (65_537, torch.uint32),
                                               (1_000_000, torch.uint32)])
def test_token_dtype_follows_the_vocabulary_size(tmp_path, vocab_size, dtype):
    path = write(tmp_path / "t.txt", "ab")
    tok = WideTokenizer(vocab_size, vocab_size - 1 - ord("b"))  # "b" gets the largest id
    split = data.prepare_source(str(path), tok)
    assert split.tokens.dtype == dtype
    assert split.tokens.tolist() == [vocab_size - 2, vocab_size - 1]


def test_subword_token_files_reused_and_rebuilt(tmp_path):
    path = write(tmp_path / "t.txt", ENGLISH)
    cache = tmp_path / "cache"
    base = [f"data.source={path}", f"data.cache_dir={cache}", "tokenizer.kind=bpe"]
    tok, _ = data.prepare_training(build_config(overrides=base + ["tokenizer.vocab_size=400"]))
    entries = sorted(os.listdir(cache))
    stamps = [os.stat(cache / e).st_mtime_ns for e in entries]
    # Trained again on the same text, the tokenizer is the same, and so are the token files.
    again, _ = data.prepare_training(build_config(overrides=base + ["tokenizer.vocab_size=400"]))
    assert again.state() == tok.state()
    assert sorted(os.listdir(cache)) == entries
    assert [os.stat(cache / e).st_mtime_ns for e in entries] == stamps
    # Another vocabulary size, or changed text, makes new ones.
    data.prepare_training(build_config(overrides=base + ["tokenizer.vocab_size=420"]))
    assert len(os.listdir(cache)) == 2 * len(entries)
    write(path, ENGLISH.replace("the", "a"))
    data.prepare_training(build_config(overrides=base + ["tokenizer.vocab_size=400"]))
    assert len(os.listdir(cache)) == 3 * len(entries)


def test_every_tokenizer_is_scored_on_the_same_val_bytes(tmp_path):
    """Bits per byte divides by the val split's UTF-8 bytes, the same whatever the tokenizer."""
    text = ENGLISH + "déjà vu 東京 🙂\n" * 20
    path = write(tmp_path / "t.txt", text)
    sizes = set()
    for kind in ["bytes", "chars", "bpe", "unigram"]:
        cfg = build_config(overrides=[f"data.source={path}", f"tokenizer.kind={kind}",
                                      "tokenizer.vocab_size=400"])
        tok, splits = data.prepare_training(cfg)
        sizes.add(splits["val"].n_bytes)
        assert len(tok.decode(splits["val"].tokens.tolist()).encode()) == splits["val"].n_bytes
    assert len(sizes) == 1


def load_fetch():
    import importlib.util

    spec = importlib.util.spec_from_file_location("fetch", Path(__file__).parents[1] / "data" / "fetch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fetch_verifies_and_unpacks_a_zipped_corpus(tmp_path, monkeypatch, capsys):
    import hashlib
    import zipfile

    fetch = load_fetch()
    text = b"some public text\n" * 1000
    archive = tmp_path / "corpus.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("corpus", text)
    good = {"url": archive.as_uri(), "size": archive.stat().st_size, "file": "corpus.txt",
            "sha256": hashlib.sha256(archive.read_bytes()).hexdigest(), "member": "corpus",
            "file_size": len(text)}
    monkeypatch.setitem(fetch.CORPORA, "demo", good)
    root = tmp_path / "data"
    assert fetch.fetch("demo", root) == 0
    assert (root / "demo" / "corpus.txt").read_bytes() == text
    assert sorted(p.name for p in (root / "demo").iterdir()) == ["corpus.txt"]
    assert fetch.fetch("demo", root) == 0 and "already here" in capsys.readouterr().out

    monkeypatch.setitem(fetch.CORPORA, "demo", {**good, "sha256": "0" * 64})
    assert fetch.fetch("demo", tmp_path / "other") == 1
    assert "does not match the expected size and SHA-256" in capsys.readouterr().err
    assert list((tmp_path / "other" / "demo").iterdir()) == []


def test_fetch_offline_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    fetch = load_fetch()
    spec = {**fetch.CORPORA["tinyshakespeare"], "url": (tmp_path / "nowhere.txt").as_uri()}
    monkeypatch.setitem(fetch.CORPORA, "tinyshakespeare", spec)
    assert fetch.fetch("tinyshakespeare", tmp_path) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "offline?" in err and "--set data.source=PATH" in err
    assert fetch.main(["nonesuch"]) == 2
