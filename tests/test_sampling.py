import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rgchat.sampling import Sampler
from rgchat.settings import INTEGERS, RANGES, validate

LOGITS = torch.tensor([1.0, 3.0, 2.5, -1.0, 0.0])


def test_greedy_picks_the_maximum():
    assert Sampler(temperature=0)(LOGITS) == 1


def test_seeded_sampling_is_reproducible_and_varies():
    a = [Sampler(temperature=1.0, seed=5)(LOGITS) for _ in range(1)]
    draws = lambda seed: (lambda s: [s(LOGITS) for _ in range(50)])(Sampler(temperature=1.0, seed=seed))
    assert draws(5) == draws(5)
    assert len(set(draws(5))) > 1
    assert a[0] == draws(5)[0]


def test_top_k_and_top_p_restrict_the_choice():
    top2 = Sampler(temperature=2.0, top_k=2, top_p=1.0, min_p=0.0, seed=0)
    assert {top2(LOGITS) for _ in range(200)} == {1, 2}
    # probabilities at temperature 1: [.07, .51, .31, .01, .03]; top_p 0.6 keeps tokens 1 and 2
    nucleus = Sampler(temperature=1.0, top_k=0, top_p=0.6, min_p=0.0, seed=0)
    assert {nucleus(LOGITS) for _ in range(200)} == {1, 2}


def test_min_p_drops_tokens_below_a_fraction_of_the_likeliest():
    # temperature 1: [.07, .51, .31, .01, .03]; min_p 0.1 keeps p >= .051: tokens 0, 1, 2
    probs = Sampler(temperature=1.0, top_k=0, top_p=1.0, min_p=0.1).probabilities(LOGITS)
    assert (probs > 0).tolist() == [True, True, True, False, False]
    torch.testing.assert_close(probs.sum(), torch.tensor(1.0))
    full = torch.softmax(LOGITS, 0)
    torch.testing.assert_close(probs[:3], full[:3] / full[:3].sum())


def test_repeat_penalty_makes_recent_tokens_less_likely():
    sampler = Sampler(temperature=0, repeat_penalty=2.0)
    assert sampler(LOGITS, recent=[]) == 1
    assert sampler(LOGITS, recent=[1, 1]) == 2  # 3.0 / 2 = 1.5 < 2.5
    penalized = sampler.penalized(LOGITS, [1, 3])
    assert penalized.tolist() == [1.0, 1.5, 2.5, -2.0, 0.0]  # positive divided, negative multiplied
    assert Sampler(temperature=0, repeat_penalty=1.0)(LOGITS, recent=[1]) == 1  # 1 is off


def test_filters_compose_in_the_distribution():
    probs = Sampler(temperature=1.0, top_k=3, top_p=0.6, min_p=0.0).probabilities(LOGITS)
    assert (probs > 0).tolist() == [False, True, True, False, False]


def test_reseed_restarts_the_stream():
    sampler = Sampler(temperature=1.0, seed=7)
    first = [sampler(LOGITS) for _ in range(30)]
    sampler.reseed(7)
    assert [sampler(LOGITS) for _ in range(30)] == first


# Every value a user can type for a setting, hostile ones included.
NUMBERS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(0, 1),
                    st.integers(-2**70, 2**70), st.sampled_from([0, 0.0, 1, 1.0, 5e-324, 1e-300, 1e300]))


@settings(max_examples=300, derandomize=True, deadline=None)
@given(values=st.fixed_dictionaries({name: NUMBERS for name in RANGES}), logits=st.lists(
    st.floats(-1e30, 1e30), min_size=1, max_size=40), recent=st.lists(st.integers(0, 39), max_size=8))
def test_no_accepted_setting_crashes_sampling(values, logits, recent):
    """A value is either refused with a ValueError naming the setting, or sampling with it always works."""
    accepted = {}
    for name, value in values.items():
        if name in INTEGERS:
            value = int(value) if isinstance(value, float) and math.isfinite(value) else value
        try:
            accepted[name] = validate(name, value)
        except ValueError as e:
            assert name in str(e)
    sampler = Sampler(**accepted)
    logits = torch.tensor(logits)
    token = sampler(logits, [t for t in recent if t < len(logits)])
    assert 0 <= token < len(logits)
    assert math.isfinite(float(logits[token]))


def test_top_p_zero_keeps_the_likeliest_token():
    assert {Sampler(temperature=1.0, top_k=0, top_p=0.0, min_p=0.0, seed=s)(LOGITS) for s in range(20)} == {1}


def test_out_of_range_settings_are_refused():
    for name, value in [("temperature", float("nan")), ("temperature", -1.0), ("top_p", 1.5), ("min_p", float("inf")),
                        ("repeat_penalty", 0.0), ("top_k", -1), ("top_k", 2.5), ("seed", 2**64), ("seed", -1),
                        ("temperature", "hot"), ("top_k", True)]:
        with pytest.raises(ValueError, match=name):
            validate(name, value)
    with pytest.raises(ValueError, match="seed"):
        Sampler(seed=99999999999999999999999)
    for name in ("temperature", "top_p", "repeat_penalty"):  # an integer too large for a float
        with pytest.raises(ValueError, match=name):
            validate(name, 10**400)
