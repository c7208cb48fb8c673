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
    top2 = Sampler(temperature=2.0, top_k=2, seed=0)
    assert {top2(LOGITS) for _ in range(200)} == {1, 2}
    # probabilities at temperature 1: [.07, .51, .31, .01, .03]; top_p 0.6 keeps tokens 1 and 2
    nucleus = Sampler(temperature=1.0, top_p=0.6, seed=0)
    assert {nucleus(LOGITS) for _ in range(200)} == {1, 2}
