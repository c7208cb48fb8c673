"""ChatSession on a tiny random model: turns prefill only their own tokens, answers always close their turn,
and /undo, /regen, stop strings and Ctrl-C leave the state exactly where they should."""

import pytest
import torch

from conftest import CYCLES, greedy_tokens, leave_after, tiny_model
from rgchat.chat import ChatSession
from rgchat.generate import Finish, Token, text
from rgchat.settings import Settings
from rgchat.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def model():
    return tiny_model(CYCLES, seed=31)


def session(model, tokenizer_path, template=True, system=None, **settings) -> ChatSession:
    settings = {"temperature": 0, "max_tokens": 12, **settings}
    return ChatSession(model, Tokenizer(tokenizer_path), Settings(**settings), template=template,
                       system=system)


def record_fed_tokens(s: ChatSession) -> list[int]:
    """Every token id that reaches the model, in order (prefill chunks and decode steps)."""
    fed: list[int] = []
    prefill, decode = s.engine.prefill, s.engine.decode
    s.engine.prefill = lambda slot, ids: (fed.extend(ids), prefill(slot, ids))[1]
    s.engine.decode = lambda slots, tokens: (fed.extend(tokens), decode(slots, tokens))[1]
    return fed


def states_equal(a, b) -> bool:
    return a.pos == b.pos and all(torch.equal(x, y) for x, y in zip(a.tensors(), b.tensors(), strict=True))


def test_turns_prefill_only_their_tokens_and_equal_one_pass(model, tokenizer_path):
    s = session(model, tokenizer_path, system="Be brief.")
    fed = record_fed_tokens(s)
    tok = s.tokenizer
    answers = [text(s.ask(q)) for q in ("Hello there", "The quick brown fox", "And then?")]
    assert len(s.transcript) == 6 and [t.role for t in s.transcript] == ["user", "model"] * 3
    assert [t.text for t in s.transcript[1::2]] == answers
    assert any(a.strip() for a in answers)
    # The first turn carries BOS and the system text; every answer is closed with <end_of_turn>\n.
    assert fed[0] == tok.bos_id and fed.count(tok.bos_id) == 1
    first_turn = fed[1:len(tok.chat_prompt("Be brief.\n\nHello there")) + 1]
    assert tok.decode(first_turn) == "<start_of_turn>user\nBe brief.\n\nHello there<end_of_turn>\n<start_of_turn>model\n"
    assert fed.count(tok.end_of_turn_id) == 6  # 3 questions + 3 answers
    assert s.state.pos == len(fed) and [t for turn in s.transcript for t in turn.ids] == fed
    # One prefill of everything the session fed gives the same state, hence the same next answer.
    one_pass = model.new_state()
    model.prefill(torch.tensor(fed), one_pass)
    assert one_pass.pos == s.state.pos
    for a, b in zip(one_pass.tensors(), s.state.tensors(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    follow_up = s.tokenizer.chat_prompt("Again")
    expected = greedy_tokens(model, fed + follow_up, 12, set(s.stop_ids))
    got = text(s.ask("Again"))
    assert got == tok.decode([t for t in expected if t not in s.stop_ids])


def test_an_answer_cut_by_max_tokens_is_still_closed(model, tokenizer_path):
    s = session(model, tokenizer_path, max_tokens=3)
    fed = record_fed_tokens(s)
    text(s.ask("Hello there"))
    assert s.stats.stop_reason == "max_tokens" and s.stats.generated_tokens == 3
    tok = s.tokenizer
    assert fed[-1 - len(tok.encode("\n")):] == [tok.end_of_turn_id, *tok.encode("\n")]
    assert s.state.pos == len(fed)


def test_undo_and_regen_restore_the_state(model, tokenizer_path):
    s = session(model, tokenizer_path)
    first = text(s.ask("Hello there"))
    before = s.state.clone()
    second = text(s.ask("The quick brown fox"))
    assert s.state.pos > before.pos
    s.undo()
    assert states_equal(s.state, before) and len(s.transcript) == 2
    with pytest.raises(ValueError):
        s.undo()  # one snapshot only
    assert text(s.ask("The quick brown fox")) == second  # greedy: same state, same answer
    assert text(s.regen()) == second
    assert len(s.transcript) == 4 and s.transcript[2].text == "The quick brown fox"
    s.clear()
    assert s.state.pos == 0 and not s.transcript
    assert text(s.ask("Hello there")) == first


def test_raw_mode_continues_plain_text(model, tokenizer_path):
    s = session(model, tokenizer_path, template=False, max_tokens=10)
    tok = s.tokenizer
    out = text(s.ask("The quick brown"))
    expected = greedy_tokens(model, [tok.bos_id] + tok.encode("The quick brown"), 10, {tok.eos_id})
    assert out == tok.decode([t for t in expected if t != tok.eos_id])
    assert tok.end_of_turn_id not in s.stop_ids


def test_stop_string_ends_the_answer_before_it(model, tokenizer_path):
    full = text(session(model, tokenizer_path, max_tokens=20).ask("Hello there"))
    assert len(full) > 6
    stop = full[3:5]
    s = session(model, tokenizer_path, max_tokens=20, stop=(stop,))
    out = text(s.ask("Hello there"))
    assert out == full[:full.index(stop)]
    assert s.stats.stop_reason == "stop_string"


def test_interrupt_stops_after_the_current_token_and_keeps_the_answer(model, tokenizer_path):
    s = session(model, tokenizer_path, max_tokens=50)
    fed = record_fed_tokens(s)
    pieces = []
    for event in s.ask("Hello there"):
        pieces.append(event.text)
        if len(pieces) == 3:
            s.cancel.set()  # what the Ctrl-C handler does
    assert s.stats.stop_reason == "interrupted" and isinstance(event, Finish) and event.reason == "cancelled"
    assert s.stats.generated_tokens < 50
    assert s.transcript[-1].text.startswith("".join(pieces[:3]))
    # every shown token reached the state, and the turn was closed after them
    tok = s.tokenizer
    answer = fed[len(tok.chat_prompt("Hello there")) + 1:-1 - len(tok.encode("\n"))]
    assert tok.decode(answer) == s.transcript[-1].text and len(answer) == s.stats.generated_tokens
    assert fed[-1 - len(tok.encode("\n"))] == tok.end_of_turn_id and s.state.pos == len(fed)


def test_interrupt_during_prefill_withdraws_the_question(model, tokenizer_path):
    s = session(model, tokenizer_path)
    text(s.ask("Hello there"))
    before = s.state.clone()
    prefill = s.engine.prefill

    def interrupting(slot, ids):
        s.cancel.set()
        return prefill(slot, ids)

    s.engine.prefill = interrupting
    assert text(s.ask("A question")) == ""
    assert s.stats.stop_reason == "interrupted"
    assert states_equal(s.state, before) and len(s.transcript) == 2


def test_a_failed_turn_is_withdrawn(model, tokenizer_path):
    """An error in the engine in the middle of an answer, or an exception the consumer throws in (it could
    not deliver the answer), leaves the conversation exactly as before the question, and nothing is saved."""
    s = session(model, tokenizer_path)
    text(s.ask("Hello there"))
    before, transcript = s.state.clone(), list(s.transcript)
    saves = []
    s.on_change = saves.append
    decode, calls = s.engine.decode, []

    def failing_decode(slots, tokens):
        calls.append(tokens)
        if len(calls) == 3:
            raise MemoryError("out of memory")
        return decode(slots, tokens)

    s.engine.decode = failing_decode
    try:
        with pytest.raises(MemoryError):
            text(s.ask("The quick brown fox"))
    finally:
        del s.engine.decode
    assert len(calls) == 3 and states_equal(s.state, before) and s.transcript == transcript and saves == []

    events = s.ask("The quick brown fox")
    assert isinstance(next(events), Token)
    with pytest.raises(OSError):
        events.throw(OSError("disk full"))  # the answer could not be written anywhere
    assert states_equal(s.state, before) and s.transcript == transcript and saves == []
    answer = text(s.ask("The quick brown fox"))  # and the conversation goes on as if neither happened
    assert saves == [s] and s.transcript[-1].text == answer


@pytest.mark.parametrize("how", ["close", "exception", "cancel"])
def test_leaving_an_answer_after_k_tokens_equals_capping_it_at_k(model, tokenizer_path, tmp_path, how):
    """However the consumer stops, the conversation is kept closed after the shown tokens: its next turn and
    its state file are those of an answer capped at that many tokens."""
    from rgchat import statefile

    k, identity = 3, {"name": "tiny", "config": model.config.to_dict(), "precision": "f32"}
    sampled = dict(temperature=1.0, seed=9, max_tokens=40)
    capped = session(model, tokenizer_path, **{**sampled, "max_tokens": k})
    text(capped.ask("Hello there"))
    capped.settings = capped.settings.replace(max_tokens=40)
    s = session(model, tokenizer_path, **sampled)
    saves = []
    s.on_change = saves.append
    leave_after(s.ask("Hello there"), k, how, s.cancel)
    assert saves == [s] and s.stats.stop_reason == "interrupted" and capped.stats.stop_reason == "max_tokens"
    assert states_equal(s.state, capped.state) and s.transcript == capped.transcript
    files = []
    for name, conversation in (("stopped", s), ("capped", capped)):
        statefile.save(tmp_path / name, conversation, identity)
        files.append(statefile.load(tmp_path / name))
    a, b = files
    assert (a.transcript, a.recent, a.settings) == (b.transcript, b.recent, b.settings)
    assert torch.equal(a.rng, b.rng) and states_equal(a.state, b.state)
    assert text(s.ask("And then?")) == text(capped.ask("And then?"))


def test_a_failed_regen_keeps_the_old_answer(model, tokenizer_path):
    s = session(model, tokenizer_path)
    text(s.ask("Hello there"))
    before = s.state.clone()
    text(s.ask("The quick brown fox"))
    answered, transcript = s.state.clone(), list(s.transcript)
    saves = []
    s.on_change = saves.append
    decode = s.engine.decode

    def failing_decode(slots, tokens):
        raise MemoryError("out of memory")

    s.engine.decode = failing_decode
    try:
        with pytest.raises(MemoryError):
            text(s.regen())
    finally:
        s.engine.decode = decode
    assert states_equal(s.state, answered) and s.transcript == transcript and saves == []
    s.undo()  # and /undo still goes back to before the exchange
    assert states_equal(s.state, before) and s.transcript == transcript[:2]


def test_clear_can_be_undone_until_the_next_turn(model, tokenizer_path):
    s = session(model, tokenizer_path)
    text(s.ask("Hello there"))
    before, transcript = s.state.clone(), list(s.transcript)
    saves = []
    s.on_change = saves.append
    s.clear()
    assert s.state.pos == 0 and s.transcript == [] and saves == []  # a saved conversation is not wiped yet
    with pytest.raises(ValueError):
        next(s.regen())
    s.undo()
    assert states_equal(s.state, before) and s.transcript == transcript and saves == [s]
    s.clear()
    text(s.ask("And then?"))  # a turn after /clear: the old conversation is gone for good
    s.undo()
    assert s.state.pos == 0 and s.transcript == []
