"""The KV cache's buffers against the whole sequence of keys and values written to them: what a
layer returns, in which order, and how much memory it holds."""

import pytest
import torch

from attnlm.kv_cache import KVCache

B, H, D = 2, 3, 4


def chunks(sizes, seed=0):
    """Random (B, H, T, D) keys and values for each T in sizes."""
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(B, H, t, D, generator=gen), torch.randn(B, H, t, D, generator=gen))
            for t in sizes]


# A prompt shorter than the window, then decode steps past several turns of the ring; a chunk
# longer than the window in the middle (a window restart's re-read) and a prompt longer than it.
@pytest.mark.parametrize("sizes", [[3] + [1] * 20, [2, 1, 1, 9, 1, 1, 1, 5, 1, 1], [12] + [1] * 9],
                         ids=["short-prompt", "long-chunks", "long-prompt"])
@pytest.mark.parametrize("window", [1, 2, 5])
def test_a_windowed_layer_returns_what_its_queries_see_in_position_order(sizes, window):
    cache = KVCache([window, 0], B, H, 64, D)
    written_k, written_v = [], []
    for k, v in chunks(sizes):
        written_k.append(k), written_v.append(v)
        whole_k, whole_v = torch.cat(written_k, 2), torch.cat(written_v, 2)  # positions 0..end
        end = whole_k.size(2)
        keys, values = cache.update(0, k, v)
        seen = keys.size(2)
        assert min(end, window - 1 + k.size(2)) <= seen <= end  # every key a new query sees
        assert torch.equal(keys, whole_k[:, :, end - seen:])  # the last ones, in order
        assert torch.equal(values, whole_v[:, :, end - seen:])
        full = cache.update(1, k, v)  # a full layer alongside: every position from 0
        assert torch.equal(full[0], whole_k) and torch.equal(full[1], whole_v)
        cache.advance(k.size(2))


def test_a_decode_step_reads_the_ring_in_place_and_returns_a_window_of_keys():
    window = 4
    cache = KVCache([window], B, H, 100, D)
    storage = cache.layers[0].keys.untyped_storage().data_ptr()
    for k, v in chunks([1] * 11):
        keys, _ = cache.update(0, k, v)
        cache.advance(1)
        assert keys.untyped_storage().data_ptr() == storage  # a view, not a copy
    assert keys.size(2) == window


def test_a_restart_after_reset_reads_nothing_from_before():
    window = 3
    cache = KVCache([window], B, H, 64, D)
    for k, v in chunks([1] * 7, seed=1):
        cache.update(0, k, v)
        cache.advance(1)
    cache.reset()
    (k, v), = chunks([2], seed=2)
    keys, values = cache.update(0, k, v)
    assert torch.equal(keys, k) and torch.equal(values, v)


def test_memory_is_fixed_at_construction_and_shrinks_with_fewer_heads():
    """Bytes by hand: float32, keys and values; a full layer max_len positions, a windowed one
    2·window slots (each position kept twice, so that any window of them is one view)."""
    max_len, window = 50, 8
    cache = KVCache([window, window, window, 0], B, H, max_len, D)
    per_position = 2 * B * H * D * 4
    expected = per_position * (3 * 2 * window + max_len)
    assert cache.nbytes == expected
    for k, v in chunks([20] + [1] * 30):
        for layer in range(4):
            cache.update(layer, k, v)
        cache.advance(k.size(2))
    assert cache.nbytes == expected and cache.length == max_len
    assert KVCache([0] * 4, B, 1, max_len, D).nbytes * H == KVCache([0] * 4, B, H, max_len, D).nbytes


def test_a_window_as_long_as_the_cache_is_a_plain_buffer():
    cache = KVCache([16, 17], B, H, 16, D)
    assert cache.nbytes == 2 * (2 * B * H * 16 * D * 4)


def test_writing_past_max_len_is_refused():
    cache = KVCache([0, 4], B, H, 8, D)
    (k, v), = chunks([9])
    with pytest.raises(ValueError, match="holds 8 positions"):
        cache.update(1, k, v)


@pytest.mark.parametrize("window", [0, 3])
def test_repeat_copies_a_prompts_keys_to_its_samples(window):
    samples = 3
    cache = KVCache([window], B * samples, H, 32, D)
    written = []
    for k, v in chunks([5, 1, 1]):  # rows 0..B-1: the prompts
        cache.update(0, k, v)
        written.append(k)
        cache.advance(k.size(2))
    cache.repeat(B)
    (k, v), = chunks([1], seed=3)
    keys, _ = cache.update(0, k.repeat(samples, 1, 1, 1), v.repeat(samples, 1, 1, 1))
    whole = torch.cat(written + [k], 2)
    for first in range(0, B * samples, B):
        assert torch.equal(keys[first:first + B], whole[:, :, whole.size(2) - keys.size(2):])
