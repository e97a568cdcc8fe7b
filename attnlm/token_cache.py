"""The token cache: the ids of a corpus's byte ranges, encoded once into files that later runs
memory-map.

An entry is `KEY.json` (its meta) and `KEY.NAME.bin` per range, KEY a hash of the corpus
content, the tokenizer and the ranges. Every file is written atomically (attnlm.files), the meta
last, so an entry whose meta exists was whole when written. The meta records each file's token
count and SHA-256; an entry whose meta does not parse, whose dtype is unknown, or whose files
have another size or checksum is encoded again (saying so on stderr), never used. Opening the
cache removes the temporary files of writers killed outright.

A cache folder that cannot be written (read-only, full) still serves the whole entries it holds;
a new entry there is an error, exit 1, that names the folder and data.cache_dir.
"""

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from attnlm.files import atomic_open, atomic_write, remove_stale_temps, write_errors
from attnlm.sources import CHUNK, iter_text
from attnlm.tokenizer import independent_chunks

FORMAT = 2  # bump when the layout of an entry changes
DTYPES = {"uint16": torch.uint16, "uint32": torch.uint32}


def cache_dir(configured=""):
    if configured:
        return Path(configured).expanduser()
    if os.environ.get("ATTNLM_CACHE"):
        return Path(os.environ["ATTNLM_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "attnlm"


class Damaged(Exception):
    """A cache entry that must not be used; the message says why."""


def load_or_encode(corpus, tokenizer, ranges, directory, progress=False):
    """{name: (tokens, n_bytes, sha256)} for named byte ranges of the corpus: tokens a
    memory-mapped 1-D tensor of small unsigned integers, n_bytes the UTF-8 bytes it encodes,
    sha256 the token file's (verified). With progress, a bar on stderr (where it is a terminal)
    follows the encoding."""
    key = hashlib.sha256(json.dumps(
        [FORMAT, corpus.content_hash(), tokenizer.state(), sorted(ranges.items())],
        sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:24]
    remove_stale_temps(directory)
    try:
        meta = _verified(directory, key, ranges)
    except FileNotFoundError:
        meta = None
    except Damaged as why:
        print(f"warning: token cache entry {key} in {directory} is damaged ({why}); "
              "encoding it again", file=sys.stderr)
        meta = None
    if meta is None:
        meta = _encode(corpus, tokenizer, ranges, directory, key, progress)
    return {name: (_map(_bin(directory, key, name), s["tokens"], meta["dtype"]), s["bytes"],
                   s["sha256"]) for name, s in meta["splits"].items()}


def _bin(directory, key, name):
    return directory / f"{key}.{name}.bin"


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _is_count(value):
    return isinstance(value, int) and value >= 0


def _verified(directory, key, ranges):
    """The meta of entry KEY if the entry is whole; FileNotFoundError if it has no meta, Damaged
    naming what is wrong otherwise."""
    try:
        meta = json.loads((directory / f"{key}.json").read_bytes())
    except FileNotFoundError:
        raise
    except (OSError, ValueError):  # UnicodeDecodeError is a ValueError too
        raise Damaged("its meta cannot be read or does not parse") from None
    splits = meta.get("splits") if isinstance(meta, dict) else None
    if not isinstance(splits, dict) or sorted(splits) != sorted(ranges) or not all(
            isinstance(s, dict) and _is_count(s.get("tokens")) and _is_count(s.get("bytes"))
            and isinstance(s.get("sha256"), str) for s in splits.values()):
        raise Damaged("its meta is incomplete")
    if meta.get("dtype") not in DTYPES:
        raise Damaged(f"unknown dtype {meta.get('dtype')!r}")
    itemsize = DTYPES[meta["dtype"]].itemsize
    for name, s in splits.items():
        path = _bin(directory, key, name)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise Damaged(f"{path.name} is missing") from None
        if size != s["tokens"] * itemsize:
            raise Damaged(f"{path.name} holds {size} bytes, not {s['tokens'] * itemsize}")
        if _sha256(path) != s["sha256"]:
            raise Damaged(f"{path.name} does not match its checksum")
    return meta


def _encode(corpus, tokenizer, ranges, directory, key, progress):
    """Write entry KEY; its meta. Failing to write is one line, exit 1, with no file left."""
    dtype = "uint16" if tokenizer.vocab_size <= 65536 else "uint32"
    meta = {"format": FORMAT, "source": corpus.spec, "dtype": dtype, "splits": {}}
    bar = tqdm(total=sum(end - start for start, end in ranges.values()), unit="B",
               unit_scale=True, desc="encoding", leave=False,
               disable=not (progress and sys.stderr.isatty()))
    try:
        with write_errors(f"the token cache in {directory}", "; free some space, or set "
                          "data.cache_dir (or $ATTNLM_CACHE) to a folder that can hold it"):
            directory.mkdir(parents=True, exist_ok=True)
            for name, (start, end) in ranges.items():
                digest, count = hashlib.sha256(), 0
                with atomic_open(_bin(directory, key, name)) as f:
                    for text in independent_chunks(iter_text(corpus, start, end)):
                        ids = np.asarray(tokenizer.encode(text), dtype=dtype).tobytes()
                        f.write(ids)
                        digest.update(ids)
                        count += len(ids) // DTYPES[dtype].itemsize
                        bar.update(len(text.encode("utf-8")))
                meta["splits"][name] = {"tokens": count, "bytes": end - start,
                                        "sha256": digest.hexdigest()}
            atomic_write(directory / f"{key}.json", json.dumps(meta))
    finally:
        bar.close()
    return meta


def _map(path, n, dtype):
    if n == 0:
        return torch.zeros(0, dtype=torch.long)
    return torch.from_file(str(path), shared=False, size=n, dtype=DTYPES[dtype])
