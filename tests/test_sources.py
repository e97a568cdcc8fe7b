import os

import pytest

from attnlm import sources
from attnlm.errors import InputError
from tests.helpers import write


def test_sources_file_folder_glob(tmp_path):
    write(tmp_path / "a.txt", "alpha\n")
    write(tmp_path / "sub" / "b.txt", "beta\n")
    write(tmp_path / ".hidden" / "c.txt", "hidden\n")
    text = lambda spec: "".join(sources.iter_text(sources.resolve_source(spec), 0, 10**9))
    assert text(str(tmp_path / "a.txt")) == "alpha\n"
    assert text(str(tmp_path)) == "alpha\nbeta\n"  # recursive, sorted, hidden skipped
    assert text(str(tmp_path / "**" / "*.txt")) == "alpha\nbeta\n"


@pytest.mark.parametrize("spec, size", [("builtin:pydoc", 400_000), ("builtin:stdlib", 10_000_000)])
def test_builtins_need_no_download(spec, size):
    corpus = sources.resolve_source(spec)
    assert corpus.size() > size


def test_source_errors(tmp_path):
    with pytest.raises(InputError, match="no such file or folder"):
        sources.resolve_source(str(tmp_path / "missing.txt"))
    with pytest.raises(InputError, match="matches no files"):
        sources.resolve_source(str(tmp_path / "*.nothing"))
    with pytest.raises(InputError, match="unknown built-in"):
        sources.resolve_source("builtin:nope")
    with pytest.raises(InputError, match="holds no text"):
        sources.resolve_source(str(write(tmp_path / "empty.txt", "")))


def test_non_utf8_file_is_named(tmp_path):
    path = write(tmp_path / "latin1.txt", "caf\xe9".encode("latin-1"))
    corpus = sources.resolve_source(str(path))
    with pytest.raises(InputError, match=r"latin1.txt is not UTF-8 text \(bad byte at offset 3\)"):
        list(sources.iter_text(corpus, 0, corpus.size()))


def test_a_bad_bytes_offset_counts_from_the_start_of_its_own_file(tmp_path, monkeypatch):
    write(tmp_path / "folder" / "a.txt", "hello world\n")
    write(tmp_path / "folder" / "b.txt", b"abc\xffdef\n")
    corpus = sources.resolve_source(str(tmp_path / "folder"))
    with pytest.raises(InputError, match=r"b.txt is not UTF-8 text \(bad byte at offset 3\)"):
        list(sources.iter_text(corpus, 0, corpus.size()))
    # A character begun at the end of one chunk and broken in the next: where it began, as
    # Python's own decode says.
    monkeypatch.setattr(sources, "CHUNK", 4)
    data = b"ab\xe2\x82Xcdef"
    with pytest.raises(UnicodeDecodeError) as python:
        data.decode("utf-8")
    corpus = sources.resolve_source(str(write(tmp_path / "split.txt", data)))
    with pytest.raises(InputError, match=rf"bad byte at offset {python.value.start}\)"):
        list(sources.iter_text(corpus, 0, corpus.size()))


def test_a_range_is_read_without_the_text_after_it(tmp_path):
    # The train split of a large corpus need not read its val split: here that would fail.
    corpus = sources.Corpus("two parts", [b"first part\n", tmp_path / "gone.txt"])
    assert "".join(sources.iter_text(corpus, 0, 11)) == "first part\n"
    assert "".join(sources.iter_text(corpus, 6, 10)) == "part"


def test_a_file_whose_name_looks_like_a_pattern_is_that_file(tmp_path):
    path = write(tmp_path / "notes[1].txt", "the text itself\n")
    write(tmp_path / "notes1.txt", "another file the pattern would match\n")
    corpus = sources.resolve_source(str(path))
    assert "".join(sources.iter_text(corpus, 0, corpus.size())) == "the text itself\n"


def test_split_is_contiguous_and_on_a_character_boundary(tmp_path):
    text = "é" * 50  # two bytes each, so an odd cut falls inside a character
    corpus = sources.resolve_source(str(write(tmp_path / "t.txt", text)))
    cut = sources.split_point(corpus, 0.49)  # 51 bytes -> moved forward to 52
    assert cut == 52
    train = "".join(sources.iter_text(corpus, 0, cut))
    val = "".join(sources.iter_text(corpus, cut, corpus.size()))
    assert train + val == text and len(train) == 26


def test_split_across_small_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "CHUNK", 7)  # characters straddle chunk edges
    text = "aé東🙂" * 40
    corpus = sources.resolve_source(str(write(tmp_path / "t.txt", text)))
    cut = sources.split_point(corpus, 0.1)
    assert "".join(sources.iter_text(corpus, 0, cut)) + "".join(sources.iter_text(corpus, cut, corpus.size())) == text

def test_an_empty_source_is_refused_not_the_working_directory(tmp_path, monkeypatch):
    write(tmp_path / "secret.txt", "not meant for training\n")
    monkeypatch.chdir(tmp_path)
    for spec in ["", "  "]:
        with pytest.raises(InputError, match="data.source is empty"):
            sources.resolve_source(spec)


def test_links_never_repeat_a_file(tmp_path):
    """A link loop (corpus/self -> corpus) and links to a file read each file once."""
    corpus = tmp_path / "corpus"
    write(corpus / "a.txt", "alpha\n")
    write(corpus / "sub" / "b.txt", "beta\n")
    os.symlink(corpus, corpus / "self")
    os.symlink(corpus / "a.txt", corpus / "sub" / "again.txt")
    os.link(corpus / "a.txt", corpus / "hard.txt")
    text = lambda spec: "".join(sources.iter_text(sources.resolve_source(spec), 0, 10**9))
    for spec in [str(corpus / "**" / "*.txt"), str(corpus), str(corpus / "**")]:
        assert text(spec) == "alpha\nbeta\n", spec


def test_a_glob_names_hidden_files_only_when_asked(tmp_path):
    write(tmp_path / "a.txt", "alpha\n")
    write(tmp_path / ".b.txt", "hidden\n")
    text = lambda spec: "".join(sources.iter_text(sources.resolve_source(spec), 0, 10**9))
    assert text(str(tmp_path / "*.txt")) == "alpha\n"
    assert text(str(tmp_path / ".*.txt")) == "hidden\n"
