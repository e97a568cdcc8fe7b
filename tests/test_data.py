import os
from pathlib import Path

import pytest
import torch
from pydoc_data.topics import topics

from attnlm import data
from attnlm.config import build_config
from attnlm.errors import InputError
from attnlm.tokenizer import ByteTokenizer, CharTokenizer


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return path


def test_sources_file_folder_glob(tmp_path):
    write(tmp_path / "a.txt", "alpha\n")
    write(tmp_path / "sub" / "b.txt", "beta\n")
    write(tmp_path / ".hidden" / "c.txt", "hidden\n")
    text = lambda spec: "".join(data.iter_text(data.resolve_source(spec), 0, 10**9))
    assert text(str(tmp_path / "a.txt")) == "alpha\n"
    assert text(str(tmp_path)) == "alpha\nbeta\n"  # recursive, sorted, hidden skipped
    assert text(str(tmp_path / "**" / "*.txt")) == "alpha\nbeta\n"


@pytest.mark.parametrize("spec, size", [("builtin:pydoc", 400_000), ("builtin:stdlib", 10_000_000)])
def test_builtins_need_no_download(spec, size):
    corpus = data.resolve_source(spec)
    assert corpus.size() > size


def test_source_errors(tmp_path):
    with pytest.raises(InputError, match="no such file or folder"):
        data.resolve_source(str(tmp_path / "missing.txt"))
    with pytest.raises(InputError, match="matches no files"):
        data.resolve_source(str(tmp_path / "*.nothing"))
    with pytest.raises(InputError, match="unknown built-in"):
        data.resolve_source("builtin:nope")
    with pytest.raises(InputError, match="holds no text"):
        data.resolve_source(str(write(tmp_path / "empty.txt", "")))


def test_non_utf8_file_is_named(tmp_path):
    path = write(tmp_path / "latin1.txt", "caf\xe9".encode("latin-1"))
    corpus = data.resolve_source(str(path))
    with pytest.raises(InputError, match=r"latin1.txt is not UTF-8 text \(bad byte at offset 3\)"):
        list(data.iter_text(corpus, 0, corpus.size()))


def test_split_is_contiguous_and_on_a_character_boundary(tmp_path):
    text = "é" * 50  # two bytes each, so an odd cut falls inside a character
    corpus = data.resolve_source(str(write(tmp_path / "t.txt", text)))
    cut = data.split_point(corpus, 0.49)  # 51 bytes -> moved forward to 52
    assert cut == 52
    train = "".join(data.iter_text(corpus, 0, cut))
    val = "".join(data.iter_text(corpus, cut, corpus.size()))
    assert train + val == text and len(train) == 26


def test_split_across_small_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "CHUNK", 7)  # characters straddle chunk edges
    text = "aé東🙂" * 40
    corpus = data.resolve_source(str(write(tmp_path / "t.txt", text)))
    cut = data.split_point(corpus, 0.1)
    assert "".join(data.iter_text(corpus, 0, cut)) + "".join(data.iter_text(corpus, cut, corpus.size())) == text


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


def test_batches_shift_by_one_and_repeat_for_a_seed():
    split = data.Split(torch.arange(1000, dtype=torch.int32), 1000)
    a = data.BatchSampler(split, block_size=16, batch_size=4, seed=3)
    b = data.BatchSampler(split, block_size=16, batch_size=4, seed=3)
    x, y = a.next()
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.long
    assert torch.equal(y, x + 1)  # y is x shifted by one token
    assert torch.equal(b.next()[0], x)
    state = a.state_dict()
    after = a.next()[0]
    a.load_state_dict(state)
    assert torch.equal(a.next()[0], after)


def test_windows_cover_every_prediction_once():
    split = data.Split(torch.arange(23), 23)
    targets = torch.cat([y.flatten() for _, y in data.windows(split, block_size=5, batch_size=2)])
    assert targets.tolist() == list(range(1, 23))


def test_too_short_split_is_named():
    with pytest.raises(InputError, match="the train split has 10 tokens; model.block_size=64"):
        data.need_tokens(data.Split(torch.zeros(10), 10), "train", 64)


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
    monkeypatch.setattr(data, "CHUNK", 97)  # chunk edges fall inside words and characters
    text = ENGLISH.replace("the", "thé 🦊") + "no newline at the end"
    path = write(tmp_path / "t.txt", text)
    cfg = build_config(overrides=[f"data.source={path}", f"tokenizer.kind={kind}",
                                  "tokenizer.vocab_size=400"])
    tok, splits = data.prepare_training(cfg)
    cut = data.split_point(data.resolve_source(str(path)), cfg.data.val_fraction)
    train_text, val_text = text.encode()[:cut].decode(), text.encode()[cut:].decode()
    assert splits["train"].tokens.tolist() == tok.encode(train_text)
    assert splits["val"].tokens.tolist() == tok.encode(val_text)


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
