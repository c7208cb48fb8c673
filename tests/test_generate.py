"""The decode loop: per-request sampling that does not depend on the other requests, prefill interleaved with
decode steps, one Finish per request, and turns closed however the loop is left."""

import dataclasses

import pytest
import torch

from conftest import CYCLES, leave_after, tiny_model
from rgchat import model as model_lib
from rgchat.engine import Engine
from rgchat.generate import Finish, Request, StopText, Token, generate, generate_many
from rgchat.sampling import Sampler
from rgchat.tokenizer import Tokenizer

SMALL_WINDOW = dataclasses.replace(CYCLES, window=16)
SETTINGS = [dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=11, max_tokens=30),
            dict(temperature=0.0, max_tokens=25),
            dict(temperature=0.7, top_k=5, seed=3, max_tokens=9),
            dict(temperature=1.3, top_p=0.5, seed=4, max_tokens=30, repeat_penalty=1.5),
            dict(temperature=1.0, min_p=0.2, seed=5, max_tokens=17),
            dict(temperature=0.0, repeat_penalty=2.0, max_tokens=30),
            dict(temperature=0.9, seed=7, max_tokens=3),
            dict(temperature=1.0, seed=8, max_tokens=30, stop=("e",))]
PROMPTS = [[2, 5, 6], list(range(2, 30)), [2], [2, 70, 71, 72], list(range(40, 60)), [2, 9], [2, 3, 4, 5, 6, 7],
           [2, 100]]


@pytest.fixture(scope="module")
def model():
    return tiny_model(SMALL_WINDOW, seed=8)


@pytest.fixture(scope="module")
def tokenizer(tokenizer_path):
    return Tokenizer(tokenizer_path)


def request(engine: Engine, tokenizer: Tokenizer, i: int) -> Request:
    return Request(engine.admit(), PROMPTS[i], Sampler(**SETTINGS[i]), tokenizer, frozenset({tokenizer.eos_id}))


def answer_alone(model, tokenizer, i: int) -> tuple[list[int], Finish]:
    engine = Engine(model)
    r = request(engine, tokenizer, i)
    events = list(generate(engine, r))
    assert isinstance(events[-1], Finish) and all(isinstance(e, Token) for e in events[:-1])
    return [e.id for e in events[:-1]], events[-1]


def test_each_request_samples_the_same_tokens_alone_and_beside_seven_others(model, tokenizer):
    alone = [answer_alone(model, tokenizer, i) for i in range(8)]
    assert alone[0][0] != alone[1][0] and len(set(alone[0][0])) > 5  # sampled, and varied
    engine = Engine(model, slots=8)
    requests = [request(engine, tokenizer, i) for i in range(8)]
    late, rounds = requests[5:], []

    def arrivals():  # the last three join after a few rounds, as into a running server
        rounds.append(1)
        return late if len(rounds) == 4 else []

    got: dict[int, list[int]] = {i: [] for i in range(8)}
    finishes: dict[int, Finish] = {}
    for r, event in generate_many(engine, requests[:5], arrivals):
        i = requests.index(r)
        assert i not in finishes  # nothing after a request's Finish
        if isinstance(event, Token):
            got[i].append(event.id)
        else:
            finishes[i] = event
    assert [got[i] for i in range(8)] == [ids for ids, _ in alone]
    assert [finishes[i].reason for i in range(8)] == [f.reason for _, f in alone]
    assert {f.reason for f in finishes.values()} >= {"length"}
    assert finishes[6].stats.generated_tokens == 3 and finishes[6].reason == "length"


def test_a_long_prompt_holds_the_others_up_by_one_chunk_at_most(model, tokenizer, monkeypatch):
    monkeypatch.setitem(model_lib.PREFILL_CHUNK, "cpu", 4)
    engine = Engine(model, slots=2)
    calls = []
    prefill, decode = engine.prefill, engine.decode
    engine.prefill = lambda slot, ids: (calls.append(("prefill", slot)), prefill(slot, ids))[1]
    engine.decode = lambda slots, tokens: (calls.append(("decode", tuple(slots))), decode(slots, tokens))[1]
    short = Request(engine.admit(), [2, 5], Sampler(temperature=0, max_tokens=12), tokenizer, frozenset())
    long = Request(engine.admit(), list(range(2, 40)), Sampler(temperature=0, max_tokens=2), tokenizer, frozenset())
    list(generate_many(engine, [short, long]))
    long_chunks = [i for i, c in enumerate(calls) if c == ("prefill", long.slot)]
    assert len(long_chunks) == 10  # 38 tokens in chunks of 4
    between = [calls[a + 1:b] for a, b in zip(long_chunks, long_chunks[1:])]
    assert all(any(c[0] == "decode" and short.slot in c[1] for c in gap) for gap in between)


@pytest.mark.parametrize("how", ["close", "exception", "cancel"])
def test_leaving_the_loop_after_k_tokens_closes_the_turn_as_a_cap_at_k_would(model, tokenizer, how):
    k = 4
    capped_engine, engine = Engine(model), Engine(model)
    close_ids = [tokenizer.end_of_turn_id, 107]
    capped = Request(capped_engine.admit(), PROMPTS[3], Sampler(**{**SETTINGS[0], "max_tokens": k}), tokenizer,
                     frozenset(), close_ids)
    list(generate(capped_engine, capped))
    r = Request(engine.admit(), PROMPTS[3], Sampler(**SETTINGS[0]), tokenizer, frozenset(), close_ids)
    leave_after(generate(engine, r), k, how, r.cancel)
    assert r.closed and r.finish.reason == "cancelled" and r.answer == capped.answer
    a, b = engine.state(r.slot), capped_engine.state(capped.slot)
    assert a.pos == b.pos and all(torch.equal(x, y) for x, y in zip(a.tensors(), b.tensors()))
    assert list(r.recent) == list(capped.recent)
    assert torch.equal(r.sampler.generator.get_state(), capped.sampler.generator.get_state())


def test_stop_text_holds_back_possible_starts():
    st = StopText(("END", "##"))
    assert st.add("hello E") == ("hello ", False)
    assert st.add("N") == ("", False)
    assert st.add("D and more") == ("", True)
    st = StopText(("END",))
    assert st.add("hello EN") == ("hello ", False)
    assert st.add("x") == ("ENx", False)
    assert st.add("E") == ("", False) and st.flush() == "E"
