"""The sampler's controls against hand-computed results, and the streaming text helpers."""

import math
import re

import pytest
import torch

from attnlm.config import build_config
from attnlm.errors import InputError
from attnlm.sampling import (Controls, IncrementalDecoder, StopFilter, apply_min_p,
                             apply_repetition_penalty, apply_temperature, apply_top_k, apply_top_p,
                             next_token)
from attnlm.tokenizer import ByteTokenizer, CharTokenizer

INF = float("inf")
# Probabilities 0.4, 0.3, 0.2, 0.1 placed out of order, so filters must map back to vocab order.
PROBS = torch.tensor([[0.2, 0.4, 0.1, 0.3]])
LOGITS = PROBS.log()


def kept(logits):
    """The vocabulary ids a filter left in each row."""
    return [sorted(torch.nonzero(row > -INF).flatten().tolist()) for row in logits]


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [5.0, 4.0, 4.0, 1.0]])
    assert kept(apply_top_k(logits, 2)) == [[1, 2], [0, 1, 2]]  # a tie with the k-th stays
    assert torch.equal(apply_top_k(logits, 0), logits) and torch.equal(apply_top_k(logits, 9), logits)
    assert torch.equal(apply_top_k(logits, 2)[0, 1:3], logits[0, 1:3])  # kept logits unchanged


@pytest.mark.parametrize("p, expected", [
    # the likeliest first (0.4, 0.3, 0.2, 0.1 at ids 1, 3, 0, 2); mass before each: 0, .4, .7, .9
    (0.35, [1]),           # 0.4 alone reaches 0.35
    (0.45, [1, 3]),        # 0.4 does not reach 0.45; 0.4 + 0.3 does
    (0.69, [1, 3]),
    (0.75, [0, 1, 3]),
    (0.95, [0, 1, 2, 3]),
    (1.0, [0, 1, 2, 3]),
])
def test_top_p_keeps_the_smallest_set_whose_mass_reaches_p(p, expected):
    assert kept(apply_top_p(LOGITS, p)) == [expected]


def test_top_p_keeps_every_token_tied_with_the_least_likely_kept():
    # Sorting alone would keep ids 1, 2, 4 (mass 0.6) and drop id 5, as likely as 2 and 4.
    logits = torch.tensor([[0.1, 0.2, 0.2, 0.1, 0.2, 0.2]]).log()
    assert kept(apply_top_p(logits, 0.5)) == [[1, 2, 4, 5]]
    assert kept(apply_top_p(torch.zeros(1, 4), 0.5)) == [[0, 1, 2, 3]]  # like top-k's ties


def test_top_p_works_row_by_row():
    logits = torch.cat([LOGITS, LOGITS.flip(-1)])
    assert kept(apply_top_p(logits, 0.45)) == [[1, 3], [0, 2]]


@pytest.mark.parametrize("min_p, expected", [
    (0.6, [1, 3]),        # threshold 0.24: 0.4 and 0.3
    (0.3, [0, 1, 3]),     # threshold 0.12: not 0.1
    (0.2, [0, 1, 2, 3]),  # threshold 0.08
    (1.0, [1]),           # only the likeliest
    (0.0, [0, 1, 2, 3]),
])
def test_min_p_keeps_tokens_at_least_min_p_times_the_likeliest(min_p, expected):
    assert kept(apply_min_p(LOGITS, min_p)) == [expected]


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens():
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0]])
    seen = torch.tensor([[True, True, False, False]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -2.0, 0.5, -3.0]]
    assert apply_repetition_penalty(logits, seen, 0.5).tolist() == [[4.0, -0.5, 0.5, -3.0]]
    assert torch.equal(apply_repetition_penalty(logits, seen, 1.0), logits)


def test_temperature_divides_logits():
    assert apply_temperature(torch.tensor([[2.0, -1.0]]), 2.0).tolist() == [[1.0, -0.5]]


def test_greedy_takes_the_argmax_after_the_repetition_penalty():
    logits = torch.tensor([[2.0, 1.5, 0.0], [0.0, 1.0, 3.0]])
    seen = torch.tensor([[True, False, False], [False, False, False]])
    assert next_token(logits, Controls(temperature=0)).tolist() == [0, 2]
    greedy = Controls(temperature=0, repetition_penalty=2.0)
    assert next_token(logits, greedy, seen).tolist() == [1, 2]


def test_sampling_draws_from_the_filtered_distribution():
    draws = 4000
    logits = LOGITS.expand(draws, -1)
    gen = torch.Generator().manual_seed(0)
    tokens = next_token(logits, Controls(temperature=1.0, top_p=0.65), generator=gen)
    counts = torch.bincount(tokens, minlength=4).tolist()
    assert counts[0] == counts[2] == 0  # only ids 1 (0.4) and 3 (0.3) survive top-p 0.65
    assert counts[1] / draws == pytest.approx(4 / 7, abs=0.03)
    # temperature 2 flattens: 0.4 : 0.3 becomes sqrt(0.4) : sqrt(0.3)
    tokens = next_token(logits, Controls(temperature=2.0, top_k=2), generator=gen)
    share = math.sqrt(0.4) / (math.sqrt(0.4) + math.sqrt(0.3))
    assert (tokens == 1).float().mean().item() == pytest.approx(share, abs=0.03)


@pytest.mark.parametrize("controls", [Controls(temperature=2.0, top_p=0.65),
                                      Controls(temperature=2.0, min_p=0.6)],
                         ids=["top-p", "min-p"])
def test_temperature_comes_before_the_filters_in_a_draw(controls):
    """At temperature 2 the probabilities are sqrt(p) renormalised, 0.230, 0.325, 0.163, 0.282:
    top-p 0.65 keeps ids 1, 3 and 0 (0.607 before 0 joins), min-p 0.6 those of at least
    0.6 x 0.325 = 0.195, ids 0, 1 and 3. Filtered before the temperature (at 1), both would keep
    ids 1 and 3 alone; without the filter, all four."""
    gen = torch.Generator().manual_seed(0)
    tokens = next_token(LOGITS.expand(4000, -1), controls, generator=gen)
    assert sorted(set(tokens.tolist())) == [0, 1, 3]


def test_same_seed_same_draws():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    draw = lambda seed: next_token(logits, Controls(0.9, 20, 0.9, 0.01, 1.2), logits > 0,
                                   torch.Generator().manual_seed(seed)).tolist()
    assert draw(5) == draw(5)


def test_controls_are_built_from_the_sample_config():
    s = build_config(overrides=["sample.temperature=0.5", "sample.top_k=7", "sample.top_p=0.9",
                                "sample.min_p=0.05", "sample.repetition_penalty=1.3"]).sample
    assert Controls.of(s) == Controls(temperature=0.5, top_k=7, top_p=0.9, min_p=0.05,
                                      repetition_penalty=1.3)


@pytest.mark.parametrize("override, message", [
    ("sample.temperature=-0.1", "sample.temperature=-0.1 must be 0 (greedy) or at least 0.0001"),
    ("sample.temperature=1e-300", "sample.temperature=1e-300"),
    ("sample.top_k=-1", "sample.top_k=-1 must not be negative"),
    ("sample.top_p=0", "sample.top_p=0.0 must be in [0.0001, 1]"),
    ("sample.top_p=1e-300", "sample.top_p=1e-300 must be in [0.0001, 1]"),
    ("sample.top_p=1.5", "sample.top_p=1.5"),
    ("sample.top_p=nan", "sample.top_p=nan must be a finite number"),
    ("sample.min_p=-0.1", "sample.min_p=-0.1 must be in [0, 1]"),
    ("sample.repetition_penalty=0", "sample.repetition_penalty=0.0 must be in [0.01, 100]"),
    ("sample.repetition_penalty=1e-300", "sample.repetition_penalty=1e-300 must be in [0.01, 100]"),
    ("sample.max_new_tokens=-1", "sample.max_new_tokens=-1 must not be negative"),
    ("sample.max_new_tokens=1e30", "times sample.num_samples=1 must be at most 100,000,000 tokens"),
    ("sample.seed=1e30", "sample.seed=1000000000000000019884624838656 must be in [0, 2**64 - 1]"),
])
def test_out_of_range_sample_values_are_config_errors(override, message):
    with pytest.raises(InputError, match=re.escape(message)):
        build_config(overrides=[override])


def test_the_smallest_allowed_sample_values_still_sample():
    """The lower ends of the ranges keep every logit finite, so a token is always drawn (below
    them float32 turns 1e-300 into 0, and the logits into NaN)."""
    s = build_config(overrides=["sample.temperature=1e-4", "sample.top_p=1e-4",
                                "sample.repetition_penalty=0.01"]).sample
    logits = torch.randn(3, 50) * 10
    for seen in (logits > 0, logits < 0):
        tokens = next_token(logits, Controls.of(s), seen, torch.Generator().manual_seed(0))
        assert tokens.shape == (3,)
    s = build_config(overrides=["sample.repetition_penalty=100"]).sample
    assert next_token(logits, Controls.of(s), torch.ones(3, 50, dtype=torch.bool)).shape == (3,)


def test_config_rejects_out_of_range_sample_values():
    with pytest.raises(InputError) as err:
        build_config(overrides=["sample.top_p=2", "sample.min_p=-1", "sample.repetition_penalty=0"])
    assert "sample.top_p=2.0" in str(err.value) and "sample.min_p=-1.0" in str(err.value)
    assert "sample.repetition_penalty=0.0" in str(err.value)


def test_incremental_decoder_emits_whole_characters_only():
    text = "aé€😀b"
    decoder = IncrementalDecoder(ByteTokenizer())
    pieces = [decoder.push(b) for b in text.encode("utf-8")]
    assert "".join(pieces) == text
    assert [p for p in pieces if p] == list(text)  # each character once, whole


def test_incremental_decoder_uses_prompt_context_and_flushes_an_unfinished_character():
    tokenizer = ByteTokenizer()
    decoder = IncrementalDecoder(tokenizer, context=tokenizer.encode("prompt é"))
    assert decoder.push(ord("x")) == "x"
    assert decoder.push(0xE2) == "" and decoder.push(0x82) == ""  # 2 of the 3 bytes of €
    assert decoder.flush() == "\ufffd"


def test_incremental_decoder_passes_an_invalid_byte_on_once_text_follows():
    decoder = IncrementalDecoder(ByteTokenizer())
    assert decoder.push(0xFF) == ""
    assert decoder.push(ord("a")) == "\ufffda"


def test_incremental_decoder_with_characters():
    tokenizer = CharTokenizer("abc€")
    decoder = IncrementalDecoder(tokenizer)
    assert [decoder.push(i) for i in tokenizer.encode("c€a")] == ["c", "€", "a"]


def test_stop_string_split_across_pieces_is_never_shown():
    stop = StopFilter(["\n\n"])
    assert stop.push("abc\n") == "abc"  # the newline might begin the stop string: held
    assert stop.push("\nxyz") == "" and stop.stopped
    assert stop.push("more") == ""


def test_held_text_is_released_when_it_does_not_become_a_stop_string():
    stop = StopFilter(["END"])
    assert stop.push("the E") == "the "
    assert stop.push("N") == ""
    assert stop.push("D!") == "" and stop.stopped
    stop = StopFilter(["END"])
    assert stop.push("EN") == "" and stop.push("x") == "ENx" and not stop.stopped
    assert stop.push("E") == "" and stop.flush() == "E"


def test_the_earliest_of_several_stop_strings_wins():
    stop = StopFilter(["world", "lo w", ""])
    assert stop.push("hello world") == "hel" and stop.stopped


def test_stop_string_inside_a_multibyte_character_sequence():
    decoder, stop = IncrementalDecoder(ByteTokenizer()), StopFilter(["€"])
    shown = [stop.push(decoder.push(b)) for b in "a€b".encode("utf-8")]
    assert "".join(shown) == "a" and stop.stopped


def test_a_newline_stop_text_also_ends_a_windows_line():
    from attnlm.prompt import stop_texts, unescape

    stops = stop_texts([unescape("\\n")])
    assert stops == ["\n", "\r\n"]
    crlf = StopFilter(stops)
    assert crlf.push("first line\r") == "first line"  # the \r may begin a line end: held
    assert crlf.push("\nsecond") == "" and crlf.stopped
    lf = StopFilter(stops)
    assert lf.push("a\rb\n") == "a\rb" and lf.stopped  # a lone \r is text
    assert stop_texts(["\r\n", "END", ""]) == ["\r\n", "END"]
    assert stop_texts(["\n\n"]) == ["\n\n", "\r\n\r\n"]
