"""Jobs from requests: a chat's prompt is what `rgchat run` would feed for the same turns, a follow-up reads
only the messages after its longest cached answer, and the prompt limit counts the tokens to be read."""

import pytest

from conftest import CYCLES, tiny_model
from rgchat import api
from rgchat.api import ApiError
from rgchat.chat import ChatSession, Turn
from rgchat.loader import LoadedModel
from rgchat.serving import Job, prepare
from rgchat.snapshots import Snapshot, SnapshotCache, message_keys
from rgchat.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def loaded(tokenizer_path):
    return LoadedModel(tiny_model(CYCLES, seed=3), Tokenizer(tokenizer_path), "tiny-it", "f32", "w" * 64,
                       "t" * 64, "tiny-it")


def chat(*messages, **fields) -> api.Call:
    return api.parse_chat({"messages": [{"role": r, "content": c} for r, c in messages], **fields})


def job(loaded, call, cache=None, limit=10_000) -> Job:
    return prepare(loaded, cache, call, limit, lambda event: None)


def test_a_cold_conversation_reads_what_the_chat_would(loaded):
    turns = [("system", "Be brief."), ("user", "Hello there"), ("assistant", "The quick fox"), ("user", "And?")]
    got = job(loaded, chat(*turns))
    session = ChatSession(loaded.model, loaded.tokenizer, template=True, system="Be brief.")
    session.replay([Turn("user", "Hello there", []), Turn("model", "The quick fox", []), Turn("user", "And?", [])],
                   reuse_ids=False)
    assert got.prompt == [t for turn in session.transcript for t in turn.ids]
    assert [t.ids for t in got.turns] == [t.ids for t in session.transcript]
    assert got.recent == list(session.recent) and got.cached_tokens == 0
    assert got.stop_ids == {loaded.tokenizer.eos_id, loaded.tokenizer.end_of_turn_id}


def test_a_follow_up_reads_only_what_follows_its_longest_cached_answer(loaded):
    c = SnapshotCache(loaded.identity(), CYCLES, 1 << 30, None, 0, lambda _: None)
    messages = [("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d"), ("user", "e")]
    keys = message_keys(c.root, messages)
    state = loaded.model.new_state()
    state.pos = 40
    c.put(keys[1], Snapshot(state, [9], [Turn("user", "a", [1] * 30), Turn("model", "b", [2] * 10)]))
    c.put(keys[2], Snapshot(state, [9], []))  # ends with a question, not an answer: never resumed
    got = job(loaded, chat(*messages), c)
    assert got.cached_tokens == 40 and got.snapshot is not None
    tok = loaded.tokenizer
    assert got.prompt == tok.chat_prompt("c") + tok.encode("d") + tok.end_of_turn() + tok.chat_prompt("e")
    assert [t.role for t in got.turns] == ["user", "model", "user", "model", "user"]
    assert got.prompt_tokens == 40 + len(got.prompt)
    # the limit counts what is read, not what is resumed
    assert job(loaded, chat(*messages), c, limit=len(got.prompt)).cached_tokens == 40
    with pytest.raises(ApiError) as e:
        job(loaded, chat(*messages), None, limit=len(got.prompt))
    assert e.value.status == 400 and e.value.code == "context_length_exceeded"


def test_a_completion_reads_plain_text(loaded):
    got = job(loaded, api.parse_completion({"prompt": "The quick brown"}))
    tok = loaded.tokenizer
    assert got.prompt == [tok.bos_id, *tok.encode("The quick brown")]
    assert got.close_ids == [] and got.stop_ids == {tok.eos_id} and got.key is None


def test_request_settings_and_defaults():
    call = chat(("user", "x"), temperature=0, top_k=5, max_completion_tokens=7, max_tokens=99, stop="END", seed=3)
    s = call.settings
    assert (s.temperature, s.top_k, s.max_tokens, s.stop, s.seed) == (0, 5, 7, ("END",), 3)
    assert chat(("user", "x")).settings.max_tokens == 1024 and chat(("user", "x")).settings.seed is None
    assert chat(("user", "x"), user="someone", n=1, logprobs=False, tool_choice="none").settings.top_k == 40
    assert chat(("developer", "s"), ("user", "x")).messages[0] == ("system", "s")
