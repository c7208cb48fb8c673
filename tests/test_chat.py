"""ChatSession on a tiny random model: turns prefill only their own tokens, answers always close their turn,
and /undo, /regen, stop strings and Ctrl-C leave the state exactly where they should."""

import pytest
import torch

from conftest import CYCLES, greedy_tokens, tiny_model
from rgchat.chat import ChatSession, StopText
from rgchat.sampling import Sampler
from rgchat.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def model():
    return tiny_model(CYCLES, seed=31)


def session(model, tokenizer_path, template=True, **kwargs) -> ChatSession:
    kwargs.setdefault("max_tokens", 12)
    return ChatSession(model, Tokenizer(tokenizer_path), Sampler(temperature=0), template=template, **kwargs)


def record_fed_tokens(s: ChatSession) -> list[int]:
    """Every token id that reaches the model, in order (prefills and steps)."""
    fed: list[int] = []
    prefill, step = s.model.prefill, s.model.step
    s.model = type("Recorder", (), {
        "prefill": lambda self, tokens, state: (fed.extend(tokens.tolist()), prefill(tokens, state))[1],
        "step": lambda self, token, state: (fed.append(token), step(token, state))[1],
        "device": s.model.device,
        "prefill_chunk": s.model.prefill_chunk,
    })()
    return fed


def states_equal(a, b) -> bool:
    return a.pos == b.pos and all(torch.equal(x, y) for x, y in zip(a.tensors(), b.tensors(), strict=True))


def test_turns_prefill_only_their_tokens_and_equal_one_pass(model, tokenizer_path):
    s = session(model, tokenizer_path, system="Be brief.")
    fed = record_fed_tokens(s)
    tok = s.tokenizer
    answers = ["".join(s.ask(q)) for q in ("Hello there", "The quick brown fox", "And then?")]
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
    got = "".join(s.ask("Again"))
    assert got == tok.decode([t for t in expected if t not in s.stop_ids])


def test_an_answer_cut_by_max_tokens_is_still_closed(model, tokenizer_path):
    s = session(model, tokenizer_path, max_tokens=3)
    fed = record_fed_tokens(s)
    "".join(s.ask("Hello there"))
    assert s.stats.stop_reason == "max_tokens" and s.stats.generated_tokens == 3
    tok = s.tokenizer
    assert fed[-1 - len(tok.encode("\n")):] == [tok.end_of_turn_id, *tok.encode("\n")]
    assert s.state.pos == len(fed)


def test_undo_and_regen_restore_the_state(model, tokenizer_path):
    s = session(model, tokenizer_path)
    first = "".join(s.ask("Hello there"))
    before = s.state.clone()
    second = "".join(s.ask("The quick brown fox"))
    assert s.state.pos > before.pos
    s.undo()
    assert states_equal(s.state, before) and len(s.transcript) == 2
    with pytest.raises(ValueError):
        s.undo()  # one snapshot only
    assert "".join(s.ask("The quick brown fox")) == second  # greedy: same state, same answer
    assert "".join(s.regen()) == second
    assert len(s.transcript) == 4 and s.transcript[2].text == "The quick brown fox"
    s.clear()
    assert s.state.pos == 0 and not s.transcript
    assert "".join(s.ask("Hello there")) == first


def test_raw_mode_continues_plain_text(model, tokenizer_path):
    s = session(model, tokenizer_path, template=False, max_tokens=10)
    tok = s.tokenizer
    out = "".join(s.ask("The quick brown"))
    expected = greedy_tokens(model, [tok.bos_id] + tok.encode("The quick brown"), 10, {tok.eos_id})
    assert out == tok.decode([t for t in expected if t != tok.eos_id])
    assert tok.end_of_turn_id not in s.stop_ids


def test_stop_string_ends_the_answer_before_it(model, tokenizer_path):
    full = "".join(session(model, tokenizer_path, max_tokens=20).ask("Hello there"))
    assert len(full) > 6
    stop = full[3:5]
    s = session(model, tokenizer_path, max_tokens=20, stop=(stop,))
    out = "".join(s.ask("Hello there"))
    assert out == full[:full.index(stop)]
    assert s.stats.stop_reason == "stop_string"


def test_stop_text_holds_back_possible_starts():
    st = StopText(("END", "##"))
    assert st.add("hello E") == ("hello ", False)
    assert st.add("N") == ("", False)
    assert st.add("D and more") == ("", True)
    st = StopText(("END",))
    assert st.add("hello EN") == ("hello ", False)
    assert st.add("x") == ("ENx", False)
    assert st.add("E") == ("", False) and st.flush() == "E"


def test_interrupt_stops_after_the_current_token_and_keeps_the_answer(model, tokenizer_path):
    s = session(model, tokenizer_path, max_tokens=50)
    fed = record_fed_tokens(s)
    pieces = []
    for piece in s.ask("Hello there"):
        pieces.append(piece)
        if len(pieces) == 3:
            s.interrupted = True  # what the Ctrl-C handler does
    assert s.stats.stop_reason == "interrupted"
    assert s.stats.generated_tokens < 50
    assert s.transcript[-1].text.startswith("".join(pieces[:3]))
    # every shown token reached the state, and the turn was closed after them
    tok = s.tokenizer
    answer = fed[len(tok.chat_prompt("Hello there")) + 1:-1 - len(tok.encode("\n"))]
    assert tok.decode(answer) == s.transcript[-1].text and len(answer) == s.stats.generated_tokens
    assert fed[-1 - len(tok.encode("\n"))] == tok.end_of_turn_id and s.state.pos == len(fed)


def test_interrupt_during_prefill_withdraws_the_question(model, tokenizer_path):
    s = session(model, tokenizer_path)
    "".join(s.ask("Hello there"))
    before = s.state.clone()
    prefill = s.model.prefill

    class Interrupting:
        device, prefill_chunk = s.model.device, s.model.prefill_chunk

        def prefill(self, tokens, state):
            s.interrupted = True
            return prefill(tokens, state)

    s.model = Interrupting()
    assert "".join(s.ask("A question")) == ""
    assert s.stats.stop_reason == "interrupted"
    assert states_equal(s.state, before) and len(s.transcript) == 2


def test_a_failed_turn_is_withdrawn(model, tokenizer_path):
    """An exception in the middle of an answer, or a consumer that stops reading, leaves the conversation
    exactly as before the question, and nothing is saved for it."""
    s = session(model, tokenizer_path)
    "".join(s.ask("Hello there"))
    before, transcript = s.state.clone(), list(s.transcript)
    saves = []
    s.on_change = saves.append
    step, calls = s.model.step, []

    def failing_step(token, state):
        calls.append(token)
        if len(calls) == 3:
            raise MemoryError("out of memory")
        return step(token, state)

    s.model.step = failing_step
    try:
        with pytest.raises(MemoryError):
            "".join(s.ask("The quick brown fox"))
    finally:
        del s.model.step
    assert len(calls) == 3 and states_equal(s.state, before) and s.transcript == transcript and saves == []

    pieces = s.ask("The quick brown fox")
    next(pieces)
    pieces.close()  # the reader went away after one piece
    assert states_equal(s.state, before) and s.transcript == transcript and saves == []
    answer = "".join(s.ask("The quick brown fox"))  # and the conversation goes on as if neither happened
    assert saves == [s] and s.transcript[-1].text == answer


def test_clear_can_be_undone_until_the_next_turn(model, tokenizer_path):
    s = session(model, tokenizer_path)
    "".join(s.ask("Hello there"))
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
    "".join(s.ask("And then?"))  # a turn after /clear: the old conversation is gone for good
    s.undo()
    assert s.state.pos == 0 and s.transcript == []
