import pytest
import torch

from attnlm.batches import BatchSampler, Split, need_tokens, windows
from attnlm.errors import InputError


def test_batches_shift_by_one_and_repeat_for_a_seed():
    split = Split(torch.arange(1000, dtype=torch.int32), 1000)
    a = BatchSampler(split, block_size=16, batch_size=4, seed=3)
    b = BatchSampler(split, block_size=16, batch_size=4, seed=3)
    x, y = a.next()
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.long
    assert torch.equal(y, x + 1)  # y is x shifted by one token
    assert torch.equal(b.next()[0], x)
    state = a.state_dict()
    after = a.next()[0]
    a.load_state_dict(state)
    assert torch.equal(a.next()[0], after)


@pytest.mark.parametrize("starts", [None, torch.arange(0, 900, 7)])
def test_one_draw_of_2n_is_two_draws_of_n(starts):
    """What lets a step's windows be the same however a job splits them (torchrun)."""
    split = Split(torch.arange(1000), 1000, starts)
    whole, halves = (BatchSampler(split, 16, 4, seed=5) for _ in range(2))
    assert torch.equal(whole.draw(64), torch.cat([halves.draw(32), halves.draw(32)]))
    x, y = whole.windows_at(torch.tensor([3, 40]))
    assert x[:, 0].tolist() == [3, 40] and torch.equal(y, x + 1)


def test_windows_cover_every_prediction_once():
    split = Split(torch.arange(23), 23)
    targets = torch.cat([y.flatten() for _, y in windows(split, block_size=5, batch_size=2)])
    assert targets.tolist() == list(range(1, 23))


def test_too_short_split_is_named():
    with pytest.raises(InputError, match="the train split has 10 tokens; model.block_size=64"):
        need_tokens(Split(torch.zeros(10), 10), "train", 64)



def test_with_starts_windows_are_the_ones_training_draws_from():
    """Every window at a start, each once, and only those: the population BatchSampler samples."""
    tokens = torch.arange(40)
    split = Split(tokens, 40, starts=torch.tensor([0, 7, 20, 34, 36]))  # 34, 36: too late
    whole = [x for x, _ in windows(split, block_size=6, batch_size=2)]
    assert torch.cat(whole)[:, 0].tolist() == [0, 7, 20]
    drawn = BatchSampler(split, block_size=6, batch_size=300, seed=0).next()[0]
    assert sorted(set(drawn[:, 0].tolist())) == [0, 7, 20]
