import torch

from rgchat.sampling import Sampler

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
