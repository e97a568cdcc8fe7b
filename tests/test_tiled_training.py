"""The tiled backend inside the model: training and cached decoding reproduce naive's numbers."""

import json

import pytest
import torch

from attnlm.attention import tiled
from attnlm.config import ModelConfig
from attnlm.model import GPT
from attnlm.train import train
from tests.helpers import text_file, tiny_config


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks smaller than the context (32), so the model's attention really runs in tiles."""
    monkeypatch.setitem(tiled.DEFAULT_BLOCKS, "cpu", {torch.float32: (8, 16)})


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_training_with_tiled_reproduces_naive(tmp_path, small_blocks):
    source = text_file(tmp_path)
    runs = {}
    for name in ("naive", "tiled"):
        train(tiny_config(source, f"model.attention={name}"), tmp_path / name, quiet=True)
        runs[name] = metrics(tmp_path / name)
    for key in ("loss", "val_loss"):
        naive = [r[key] for r in runs["naive"] if key in r]
        got = [r[key] for r in runs["tiled"] if key in r]
        assert len(got) == len(naive) > 0
        assert got == pytest.approx(naive, rel=1e-5), key


def test_cached_decoding_with_tiled_matches_naive(small_blocks):
    """Prefill then one token at a time (Tq < Tk), against naive on the whole sequence."""
    torch.manual_seed(0)
    models = {}
    for name in ("naive", "tiled"):
        torch.manual_seed(0)
        models[name] = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=40,
                                       attention=name), vocab_size=50).eval()
    idx = torch.randint(0, 50, (2, 40))
    with torch.no_grad():
        want, _ = models["naive"](idx)
        cache = models["tiled"].new_cache(batch=2, max_len=40)
        steps = [models["tiled"](idx[:, :27], cache=cache)[0]]
        steps += [models["tiled"](idx[:, t : t + 1], cache=cache)[0] for t in range(27, 40)]
    torch.testing.assert_close(torch.cat(steps, dim=1), want, atol=1e-5, rtol=1e-5)
