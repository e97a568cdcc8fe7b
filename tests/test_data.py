import os

import pytest
import torch

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
