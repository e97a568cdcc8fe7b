"""Shared set-up for tests that train: a small text and a config small enough to run in seconds."""

from attnlm.config import build_config

TEXT = "".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(60))


def text_file(tmp_path, text=TEXT):
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    return path


TINY = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=32",
        "train.batch_size=4", "train.max_iters=20", "train.eval_interval=10", "train.eval_iters=2",
        "train.log_interval=1", "train.warmup_iters=5", "train.threads=1"]


def tiny_config(source, *overrides):
    return build_config(overrides=[f"data.source={source}", *TINY, *overrides])


def write(path, text):
    """A file at path (its folders made) holding text (str as UTF-8, or bytes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return path
