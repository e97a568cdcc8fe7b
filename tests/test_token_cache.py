import errno
import json
import os
import subprocess
import sys

import pytest

from attnlm import files
from attnlm.data import prepare_source
from attnlm.errors import AttnlmError
from attnlm.tokenizer import ByteTokenizer
from tests.helpers import write

TEXT = "".join(f"line {i}: the quick brown fox\n" for i in range(200))


def entry(cache):
    """The names in the cache folder, and the meta of its one entry."""
    names = sorted(os.listdir(cache))
    meta = next(n for n in names if n.endswith(".json"))
    return names, json.loads((cache / meta).read_text())


def encoded(tmp_path):
    """The tokens of the test text from the cache in tmp_path, as a list."""
    source = write(tmp_path / "t.txt", TEXT)
    return prepare_source(str(source), ByteTokenizer(), str(tmp_path / "cache")).tokens.tolist()


KILLED_WHILE_ENCODING = """
import os, signal, sys
from attnlm import sources
from attnlm.data import prepare_source
from attnlm.tokenizer import ByteTokenizer

class KilledOnSecondChunk(ByteTokenizer):
    calls = 0

    def encode(self, text):
        self.calls += 1
        if self.calls == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().encode(text)

sources.CHUNK = 64
prepare_source(sys.argv[1], KilledOnSecondChunk(), sys.argv[2])
"""


def test_temp_files_of_an_encoder_killed_outright_are_removed(tmp_path):
    source, cache = write(tmp_path / "t.txt", TEXT), tmp_path / "cache"
    killed = subprocess.run([sys.executable, "-c", KILLED_WHILE_ENCODING, source, cache],
                            env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert killed.returncode == -9
    assert any(".tmp" in name for name in os.listdir(cache))  # what the dead writer left
    assert encoded(tmp_path) == list(TEXT.encode())
    names, _ = entry(cache)
    assert not any(".tmp" in name for name in names), names


def damage(cache, how):
    names, meta = entry(cache)
    meta_path = cache / next(n for n in names if n.endswith(".json"))
    token_file = cache / next(n for n in names if n.endswith(".bin"))
    data = token_file.read_bytes()
    if how == "truncated":
        token_file.write_bytes(data[: len(data) // 2])
    elif how == "overwritten":  # same size, other tokens: only the checksum sees it
        token_file.write_bytes(data[::-1])
    elif how == "missing":
        token_file.unlink()
    elif how == "meta garbage":
        meta_path.write_bytes(b"\x00{not json")
    elif how == "meta a list":
        meta_path.write_text("[1, 2]")
    elif how == "unknown dtype":
        meta_path.write_text(json.dumps({**meta, "dtype": "int8"}))
    elif how == "no checksum":
        meta["splits"]["all"].pop("sha256")
        meta_path.write_text(json.dumps(meta))


@pytest.mark.parametrize("how", ["truncated", "overwritten", "missing", "meta garbage",
                                 "meta a list", "unknown dtype", "no checksum"])
def test_a_damaged_entry_is_encoded_again_never_used(tmp_path, capsys, how):
    assert encoded(tmp_path) == list(TEXT.encode())
    damage(tmp_path / "cache", how)
    assert encoded(tmp_path) == list(TEXT.encode())
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is damaged" in err and "encoding it again" in err
    assert encoded(tmp_path) == list(TEXT.encode())  # and whole again: used as it is
    assert capsys.readouterr().err == ""


def failing_writes(monkeypatch, code, after):
    """Files written through attnlm.files fail with OSError `code` once `after` bytes are in."""
    real_open = open

    class Failing:
        def __init__(self, f):
            self.f, self.left = f, after

        def write(self, data):
            if len(data) > self.left:
                raise OSError(code, os.strerror(code))
            self.left -= len(data)
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

    monkeypatch.setattr(files, "open", lambda *a, **k: Failing(real_open(*a, **k)), raising=False)


def test_a_full_disk_leaves_no_partial_token_file(tmp_path, monkeypatch):
    monkeypatch.setattr("attnlm.sources.CHUNK", 64)
    failing_writes(monkeypatch, errno.ENOSPC, after=1000)
    with pytest.raises(AttnlmError, match="cannot write the token cache in .*: no space left on the device; free ") as err:
        encoded(tmp_path)
    assert err.value.exit_code == 1 and "\n" not in str(err.value)
    assert os.listdir(tmp_path / "cache") == []  # neither the partial file nor a meta


def test_a_read_only_cache_serves_its_entries_and_refuses_new_ones(tmp_path, monkeypatch):
    assert encoded(tmp_path) == list(TEXT.encode())
    failing_writes(monkeypatch, errno.EROFS, after=0)
    assert encoded(tmp_path) == list(TEXT.encode())
    write(tmp_path / "t.txt", TEXT + "more\n")
    with pytest.raises(AttnlmError, match="cannot write the token cache in .*: Read-only file "
                                          "system; free some space, or set data.cache_dir") as err:
        prepare_source(str(tmp_path / "t.txt"), ByteTokenizer(), str(tmp_path / "cache"))
    assert err.value.exit_code == 1
