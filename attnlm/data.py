"""Text sources -> token files (memory-mapped, cached by content hash) -> batches.

A corpus is a list of parts (files, or in-memory bytes for the built-ins) read as one stream of
UTF-8 text. The split is contiguous: the first (1 - val_fraction) of the bytes trains, the rest
validates, cut at a character boundary. Text is streamed in chunks from disk into the token
files, so a corpus larger than memory never sits whole in Python objects.
"""

import codecs
import glob
import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from attnlm.errors import InputError

CHUNK = 1 << 20  # bytes read and encoded at a time
FORMAT = 1  # bump when the token-file layout changes


@dataclass
class Corpus:
    spec: str
    parts: list  # Path or bytes, in order

    def size(self):
        return sum(len(p) if isinstance(p, bytes) else p.stat().st_size for p in self.parts)

    def iter_parts(self):
        """(name, iterator of byte chunks) for each part."""
        for part in self.parts:
            if isinstance(part, bytes):
                yield self.spec, (part[i : i + CHUNK] for i in range(0, len(part), CHUNK))
            else:
                yield str(part), _read_chunks(part)

    def content_hash(self):
        h = hashlib.sha256()
        for _, chunks in self.iter_parts():
            for chunk in chunks:
                h.update(chunk)
            h.update(b"\0part\0")
        return h.hexdigest()


def _read_chunks(path):
    try:
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                yield chunk
    except OSError as err:
        raise InputError(f"cannot read {path}: {err.strerror}") from None


def _builtin_pydoc():
    from pydoc_data.topics import topics

    return [("\n\n".join(topics[k] for k in sorted(topics)) + "\n").encode("utf-8")]


def _builtin_stdlib():
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
    parts = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in skip)
        for name in sorted(files):
            if name.endswith(".py"):
                data = (Path(folder) / name).read_bytes()
                if _is_utf8(data):  # a few test fixtures are deliberately in other encodings
                    parts.append(data)
    return parts


def _is_utf8(data):
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


BUILTINS = {"builtin:pydoc": _builtin_pydoc, "builtin:stdlib": _builtin_stdlib}


def _visible_files(folder):
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).parts
        if path.is_file() and not any(p.startswith(".") for p in rel):
            yield path


def resolve_source(spec):
    """A Corpus for a file, a folder (recursive, hidden files skipped), a glob or a built-in."""
    if spec in BUILTINS:
        parts = BUILTINS[spec]()
    elif spec.startswith("builtin:"):
        raise InputError(f"data.source={spec!r}: unknown built-in; choose {', '.join(BUILTINS)}")
    elif any(c in spec for c in "*?["):
        parts = [Path(p) for p in sorted(glob.glob(spec, recursive=True)) if os.path.isfile(p)]
        if not parts:
            raise InputError(f"data.source={spec!r}: the pattern matches no files")
    else:
        path = Path(spec).expanduser()
        if path.is_dir():
            parts = list(_visible_files(path))
        elif path.is_file():
            parts = [path]
        else:
            raise InputError(f"data.source={spec!r}: no such file or folder")
        if not os.access(path, os.R_OK):
            raise InputError(f"data.source={spec!r}: permission denied")
    corpus = Corpus(spec, parts)
    if corpus.size() == 0:
        raise InputError(f"data.source={spec!r} holds no text")
    return corpus


def iter_text(corpus, start, end):
    """Decoded text chunks for the byte range [start, end) of the corpus stream."""
    offset = 0
    for name, chunks in corpus.iter_parts():
        decoder = codecs.getincrementaldecoder("utf-8")()
        for chunk in chunks:
            lo, hi = max(start - offset, 0), min(end - offset, len(chunk))
            base = offset
            offset += len(chunk)
            if lo >= hi:
                continue
            try:
                text = decoder.decode(chunk[lo:hi], final=hi < len(chunk) or offset >= end)
            except UnicodeDecodeError as err:
                raise InputError(
                    f"{name} is not UTF-8 text (bad byte at offset {base + lo + err.start}); "
                    "convert it or leave it out of data.source"
                ) from None
            if text:
                yield text
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise InputError(f"{name} is not UTF-8 text (it ends inside a character)") from None


def split_point(corpus, val_fraction):
    """Byte offset where the val split starts, moved forward to the next character boundary."""
    total = corpus.size()
    cut = int(total * (1 - val_fraction))
    offset = 0
    for _, chunks in corpus.iter_parts():
        for chunk in chunks:
            if offset + len(chunk) > cut:
                i = cut - offset
                while i < len(chunk) and chunk[i] & 0xC0 == 0x80:  # UTF-8 continuation byte
                    i += 1
                cut = offset + i
                if i < len(chunk):
                    return cut
            offset += len(chunk)
    return total


def cache_dir(configured=""):
    if configured:
        return Path(configured).expanduser()
    if os.environ.get("ATTNLM_CACHE"):
        return Path(os.environ["ATTNLM_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "attnlm"


TOKEN_DTYPES = {"uint16": torch.uint16, "uint32": torch.uint32}


def _dtype_for(vocab_size):
    return "uint16" if vocab_size <= 65536 else "uint32"


def _open_tokens(path, n, dtype):
    if n == 0:
        return torch.zeros(0, dtype=torch.long)
    return torch.from_file(str(path), shared=False, size=n, dtype=TOKEN_DTYPES[dtype])


def encode_ranges(corpus, tokenizer, ranges, directory, progress=None):
    """Token tensors (memory-mapped) for named byte ranges of the corpus, cached on disk by the
    content, the tokenizer and the ranges; a concurrent writer never leaves a half-written entry."""
    key = hashlib.sha256(json.dumps(
        [FORMAT, corpus.content_hash(), tokenizer.state(), sorted(ranges.items())],
        sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:24]
    directory.mkdir(parents=True, exist_ok=True)
    meta_path = directory / f"{key}.json"
    if not meta_path.exists():
        dtype = _dtype_for(tokenizer.vocab_size)
        meta = {"source": corpus.spec, "dtype": dtype, "splits": {}}
        for name, (start, end) in ranges.items():
            final = directory / f"{key}.{name}.bin"
            tmp = final.with_suffix(f".tmp{os.getpid()}")
            count = 0
            with open(tmp, "wb") as f:
                for text in iter_text(corpus, start, end):
                    ids = np.asarray(tokenizer.encode(text), dtype=dtype)
                    f.write(ids.tobytes())
                    count += len(ids)
                    if progress:
                        progress(len(text.encode("utf-8")))
            os.replace(tmp, final)
            meta["splits"][name] = {"tokens": count, "bytes": end - start}
        tmp = meta_path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, meta_path)
    meta = json.loads(meta_path.read_text())
    return {name: Split(_open_tokens(directory / f"{key}.{name}.bin", s["tokens"], meta["dtype"]),
                        s["bytes"])
            for name, s in meta["splits"].items()}


@dataclass
class Split:
    tokens: torch.Tensor  # 1-D, memory-mapped, small unsigned integers
    n_bytes: int  # UTF-8 bytes of the text it encodes (for bits per byte)

    def __len__(self):
        return len(self.tokens)


class BatchSampler:
    """Random windows of block_size + 1 tokens; x is a window, y the same shifted by one."""

    def __init__(self, split, block_size, batch_size, seed, device="cpu"):
        self.tokens, self.block_size, self.batch_size = split.tokens, block_size, batch_size
        self.device = torch.device(device)
        self.generator = torch.Generator().manual_seed(seed)
        self.window = torch.arange(block_size + 1)

    def next(self):
        starts = torch.randint(len(self.tokens) - self.block_size, (self.batch_size, 1),
                               generator=self.generator)
        chunk = self.tokens[starts + self.window].long()
        if self.device.type == "cuda":
            chunk = chunk.pin_memory().to(self.device, non_blocking=True)
        return chunk[:, :-1], chunk[:, 1:]

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])


def windows(split, block_size, batch_size):
    """Every token of a split predicted exactly once: consecutive windows overlapping by one,
    full ones batched, a shorter last one alone."""
    n = len(split.tokens) - 1  # predictions to make
    full = list(range(0, n - block_size + 1, block_size))
    for i in range(0, len(full), batch_size):
        yield _stack(split.tokens, full[i : i + batch_size], block_size)
    if n % block_size:
        yield _stack(split.tokens, [n - n % block_size], n % block_size)


def _stack(tokens, starts, length):
    idx = torch.tensor(starts).unsqueeze(1) + torch.arange(length + 1)
    chunk = tokens[idx].long()
    return chunk[:, :-1], chunk[:, 1:]


def need_tokens(split, name, block_size):
    if len(split) < block_size + 1:
        raise InputError(
            f"the {name} split has {len(split)} tokens; model.block_size={block_size} needs at "
            f"least {block_size + 1} (use more text, a smaller block_size or val_fraction)"
        )


def prepare_training(cfg, tokenizer=None, progress=None):
    """(tokenizer, {'train': Split, 'val': Split}) for a RunConfig; the tokenizer is trained unless
    given (a resumed run keeps its own)."""
    from attnlm.tokenizer import train_tokenizer

    corpus = resolve_source(cfg.data.source)
    total, cut = corpus.size(), split_point(corpus, cfg.data.val_fraction)
    if tokenizer is None:
        tokenizer = train_tokenizer(cfg.tokenizer, iter_text(corpus, 0, total))
    splits = encode_ranges(corpus, tokenizer, {"train": (0, cut), "val": (cut, total)},
                           cache_dir(cfg.data.cache_dir), progress)
    return tokenizer, splits


def prepare_source(spec, tokenizer, configured_cache=""):
    """The whole of another source as one Split, encoded with an existing tokenizer."""
    corpus = resolve_source(spec)
    return encode_ranges(corpus, tokenizer, {"all": (0, corpus.size())},
                         cache_dir(configured_cache))["all"]
