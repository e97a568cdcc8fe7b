"""The data stages joined: a source (attnlm.sources) -> token files in the cache
(attnlm.token_cache) -> splits that batches are drawn from (attnlm.batches).

The split is contiguous: the first (1 - val_fraction) of the source's bytes trains, the rest
validates, cut at a character boundary.
"""

from attnlm import tasks
from attnlm.batches import BatchSampler, Split, need_tokens, windows
from attnlm.sources import iter_text, resolve_source, split_point
from attnlm.token_cache import cache_dir, load_or_encode
from attnlm.tokenizer import learning_end, train_tokenizer

__all__ = ["BatchSampler", "Split", "cache_dir", "need_tokens", "prepare_source",
           "prepare_training", "resolve_source", "windows"]


def prepare_training(cfg, tokenizer=None, progress=False):
    """(tokenizer, {'train': Split, 'val': Split}) for a RunConfig; the tokenizer is trained unless
    given (a resumed run keeps its own)."""
    spec = cfg.data.source
    if tasks.is_synthetic(spec):
        tasks.check_fits(spec, cfg.model.block_size)
    corpus = resolve_source(spec)
    total, cut = corpus.size(), split_point(corpus, cfg.data.val_fraction)
    if tokenizer is None:
        end = learning_end(cfg.tokenizer.kind, cut, total)
        tokenizer = train_tokenizer(cfg.tokenizer, iter_text(corpus, 0, end))
    ranges = {"train": (0, cut), "val": (cut, total)}
    return tokenizer, _splits(corpus, tokenizer, ranges, cfg.data.cache_dir, progress)


def prepare_source(spec, tokenizer, configured_cache="", progress=False):
    """The whole of another source as one Split, encoded with an existing tokenizer."""
    corpus = resolve_source(spec)
    return _splits(corpus, tokenizer, {"all": (0, corpus.size())}, configured_cache, progress)["all"]


def _splits(corpus, tokenizer, ranges, configured_cache, progress):
    encoded = load_or_encode(corpus, tokenizer, ranges, cache_dir(configured_cache), progress)
    starts = tasks.example_starts if tasks.is_synthetic(corpus.spec) else lambda *_: None
    return {name: Split(tokens, n_bytes, starts(tokens, tokenizer), sha256)
            for name, (tokens, n_bytes, sha256) in encoded.items()}
