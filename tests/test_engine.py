"""The engine's slots and batched decode step: a conversation decodes to the same greedy tokens alone or
beside others (batch-invariant arithmetic), at any mix of positions, through admission and release."""

import dataclasses

import pytest
import torch

from conftest import CYCLES, tiny_model
from rgchat import quant, step_ops
from rgchat.engine import Engine, EngineFull
from rgchat.quant import quantize_model
from rgchat.state import State

SMALL_WINDOW = dataclasses.replace(CYCLES, window=16)  # conversations pass the window within a test
PROMPTS = [[2, 7], [2, 30, 31, 32, 33], list(range(2, 40)), [2], list(range(100, 120)), [2, 9, 9, 9],
           list(range(300, 355)), [2, 400, 401]]  # ragged: some already past the window after prefill
STEPS = 24


@pytest.fixture(scope="module", params=["f32", "int8"])
def model(request):
    model = tiny_model(SMALL_WINDOW, seed=5)
    return quantize_model(model, "int8") if request.param == "int8" else model


def prefill(engine: Engine, slot: int, prompt: list[int]) -> int:
    chunk = engine.model.prefill_chunk
    for i in range(0, len(prompt), chunk):
        logits = engine.prefill(slot, prompt[i:i + chunk])
    return int(torch.argmax(logits))


def alone(model, prompt: list[int], steps: int = STEPS) -> list[int]:
    engine = Engine(model)
    slot = engine.admit()
    tokens = [prefill(engine, slot, prompt)]
    for _ in range(steps):
        tokens.append(int(torch.argmax(engine.decode([slot], tokens[-1:])[0])))
    return tokens


def together(model, prompts: list[list[int]], steps: int = STEPS) -> list[list[int]]:
    engine = Engine(model, slots=len(prompts))
    slots = [engine.admit() for _ in prompts]
    tokens = [[prefill(engine, slot, p)] for slot, p in zip(slots, prompts)]
    for _ in range(steps):
        logits = engine.decode(slots, [t[-1] for t in tokens])
        for t, row in zip(tokens, logits):
            t.append(int(torch.argmax(row)))
    return tokens


@pytest.fixture(scope="module")
def expected(model):
    runs = [alone(model, p) for p in PROMPTS]
    assert len({tuple(r) for r in runs}) == len(runs) and all(len(set(r)) > 3 for r in runs)  # output varies
    return runs


@pytest.mark.parametrize("batch", range(1, 9))
def test_batched_greedy_decoding_equals_decoding_alone(model, expected, batch):
    assert together(model, PROMPTS[:batch]) == expected[:batch]


def test_batched_logits_are_bitwise_those_of_decoding_alone(model):
    """Stronger than equal tokens: every row of a batched step is exactly the one-row step's result."""
    prompts = PROMPTS[:8]
    engine = Engine(model, slots=8)
    slots = [engine.admit() for _ in prompts]
    first = [prefill(engine, slot, p) for slot, p in zip(slots, prompts)]
    singles = [engine.release(slot) for slot in slots]
    for batch in (2, 5, 8):
        for slot, state in zip(slots[:batch], singles):
            engine.admit(state)
        logits = engine.decode(slots[:batch], first[:batch])
        for slot in slots[:batch]:
            engine.release(slot)
        for i in range(batch):
            one = Engine(model)
            logits_alone = one.decode([one.admit(singles[i])], first[i:i + 1])[0]
            assert torch.equal(logits[i], logits_alone), (batch, i)


@pytest.mark.parametrize("vnni", [True, False])
def test_both_cpu_int8_kernels_are_batch_invariant(monkeypatch, vnni):
    monkeypatch.setattr(quant, "cpu_has_vnni", lambda: vnni)
    model = quantize_model(tiny_model(SMALL_WINDOW, seed=5), "int8")
    assert together(model, PROMPTS[:5], 12) == [alone(model, p, 12) for p in PROMPTS[:5]]


def test_admitting_and_releasing_in_the_middle_of_a_batch(model, expected):
    """Conversations join and leave while others decode; one leaves as a State and comes back in another
    slot: every one still gets exactly its tokens alone."""
    engine = Engine(model, slots=3)
    running: dict[int, tuple[int, list[int]]] = {}  # slot -> (conversation, tokens so far)
    parked: dict[int, tuple[State, list[int]]] = {}
    waiting = list(range(6))
    done: dict[int, list[int]] = {}
    step = 0
    while waiting or running or parked:
        if waiting and engine.free and step % 3 == 0:  # join every third step
            i = waiting.pop(0)
            slot = engine.admit()
            running[slot] = (i, [prefill(engine, slot, PROMPTS[i])])
        if parked and engine.free and step % 5 == 0:
            i, (state, tokens) = next(iter(parked.items()))
            del parked[i]
            running[engine.admit(state)] = (i, tokens)
        if running:
            slots = sorted(running, reverse=True)  # any order of slots
            logits = engine.decode(slots, [running[s][1][-1] for s in slots])
            for slot, row in zip(slots, logits):
                running[slot][1].append(int(torch.argmax(row)))
        for slot, (i, tokens) in list(running.items()):
            if i == 1 and len(tokens) == 7:  # conversation 1 leaves for a while as a State
                parked[i] = (engine.release(slot), tokens)
                del running[slot]
            elif len(tokens) == STEPS + 1:
                done[i] = tokens
                engine.release(slot)
                del running[slot]
        step += 1
    assert [done[i] for i in range(6)] == expected[:6]


def test_slots_are_independent_states():
    model = tiny_model(SMALL_WINDOW, seed=5)
    engine = Engine(model, slots=2)
    a, b = engine.admit(), engine.admit()
    with pytest.raises(EngineFull):
        engine.admit()
    prefill(engine, a, PROMPTS[2])
    assert engine.state(b).pos == 0 and all(not t.any() for t in engine.state(b).tensors())
    released = engine.release(a)
    assert released.pos == len(PROMPTS[2]) and engine.free == [a]
    with pytest.raises(ValueError):
        engine.state(a)  # a free slot holds no conversation
    engine.state(b).pos = 3
    again = engine.admit()
    assert again == a and engine.state(a).pos == 0 and engine.state(b).pos == 3  # admitted empty, b untouched
    with pytest.raises(ValueError):
        engine.decode([a, b], [1, 1])  # a fresh conversation starts with a prefill
    with pytest.raises(ValueError):
        engine.decode([b, b], [1, 1])  # each slot once
    engine.release(a)
    with pytest.raises(ValueError, match="does not fit"):
        engine.admit(State.empty(CYCLES, torch.float32))  # another model's shape
    assert engine.free == [a]  # and the slot is still free


class EagerGraph:
    """Stands in for a captured CUDA graph (rgchat/cuda_graph.py): the same step, `decode_rows` over the
    pool's first rows, run eagerly, so that the engine's handling of a graph is tested where CUDA is not."""

    def __init__(self, engine: Engine, rows: int):
        self.model, self.pool, self.rows = engine.model, engine.pool.rows(0, rows), rows

    def __call__(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        return self.model.decode_rows(torch.tensor(tokens), torch.tensor(positions), self.pool)


def test_a_graph_of_the_first_rows_decodes_some_slots_and_puts_the_others_back(model, monkeypatch):
    """Slots 2 and 0 decode through a graph of rows 0..3 while slot 1 holds a conversation that is not
    decoding, and slot 3 is free: slot 1 comes back bit for bit, and 2 and 0 get the tokens they get when
    slot 1 is free too. (The eager steps compared with run torch's operations, as the graph's step does.)"""
    monkeypatch.setenv(step_ops.ENV_VAR, "torch")

    def run(with_waiting: bool) -> tuple[list[list[int]], Engine]:
        engine = Engine(model, slots=4)
        tokens = {}
        for i in range(3):
            slot = engine.admit()
            tokens[slot] = [prefill(engine, slot, PROMPTS[i])]
        if not with_waiting:
            engine.release(1)
        graph = EagerGraph(engine, 4)
        firsts = [singles.decode([singles.admit(engine.state(slot).clone())], tokens[slot][-1:])[0]
                  for slot, singles in ((2, Engine(model)), (0, Engine(model)))]
        for step in range(STEPS):
            logits = engine._replay(graph, [2, 0], [tokens[2][-1], tokens[0][-1]])
            if step == 0:  # each row is its slot's (the graph's attention rounds apart from the eager step's)
                for got, want in zip(logits, firsts, strict=True):
                    torch.testing.assert_close(got, want, rtol=0, atol=0.05 * want.abs().max().item())
            tokens[2].append(int(torch.argmax(logits[0])))
            tokens[0].append(int(torch.argmax(logits[1])))
        return [tokens[0], tokens[2]], engine

    alone, _ = run(with_waiting=False)
    assert all(len(set(t)) > 3 for t in alone)  # the output varies
    together, engine = run(with_waiting=True)
    assert together == alone
    reference = Engine(model)
    slot = reference.admit()
    prefill(reference, slot, PROMPTS[1])
    assert engine.state(1).pos == reference.state(slot).pos == len(PROMPTS[1])
    assert all(torch.equal(a, b) for a, b in zip(engine.state(1).tensors(), reference.state(slot).tensors()))
    assert engine.state(0).pos == len(PROMPTS[0]) + STEPS and engine.state(2).pos == len(PROMPTS[2]) + STEPS
