"""The interactive chat, driven through a pseudo-terminal as a user would drive it."""

import os
import re
import sys

import pexpect
import pytest

from conftest import CYCLES, tiny_model, write_hf_folder
from rgchat.chat import ChatSession
from rgchat.checkpoint import convert
from rgchat.repl import history_path
from rgchat.sampling import Sampler
from rgchat.tokenizer import Tokenizer

MODEL_SEED = 31
PROMPT = ">>> "


@pytest.fixture(scope="module")
def it_file(tmp_path_factory, tokenizer_path):
    folder = write_hf_folder(tiny_model(CYCLES, seed=MODEL_SEED), tmp_path_factory.mktemp("m") / "tiny-it",
                             tokenizer_path)
    return convert(folder, "f32", tmp_path_factory.mktemp("f") / "tiny-it.safetensors")


def greedy_answers(tokenizer_path, questions, undo_after=None):
    """Answers of an in-process greedy session (12 tokens), optionally undoing after question `undo_after`."""
    s = ChatSession(tiny_model(CYCLES, seed=MODEL_SEED), Tokenizer(tokenizer_path), Sampler(temperature=0),
                    template=True, max_tokens=12)
    out = []
    for i, q in enumerate(questions):
        out.append("".join(s.ask(q)))
        if i == undo_after:
            s.undo()
    return out


def spawn(*args: str) -> pexpect.spawn:
    env = {**os.environ, "TERM": "dumb", "NO_COLOR": "1"}
    child = pexpect.spawn(sys.executable, ["-m", "rgchat", "run", *args], env=env, encoding="utf-8",
                          codec_errors="replace", timeout=60, dimensions=(40, 200))
    child.expect_exact(PROMPT)
    return child


def say(child: pexpect.spawn, line: str) -> str:
    """Send a line; return what was printed until the next prompt, without the echo and terminal codes."""
    child.sendline(line)
    child.expect_exact(PROMPT)
    text = re.sub(r"\x1b\[\?2004[hl]", "", child.before).replace("\r\n", "\n").replace("\r", "")
    return text.split("\n", 1)[1] if "\n" in text else ""


def test_exchange_settings_undo_regen_and_bye(it_file, tokenizer_path):
    child = spawn(str(it_file), "--temperature", "0", "--max-tokens", "12")
    q1, q2, q3 = "Hello there", "The quick brown fox", "And then?"
    a1, a2 = greedy_answers(tokenizer_path, [q1, q2])
    a3 = greedy_answers(tokenizer_path, [q1, q2, q3], undo_after=1)[2]  # q3 asked right after a1
    assert a1 and a2 and a3 and a2 != a3
    assert say(child, q1).startswith(a1 + "\n")
    assert say(child, q2).startswith(a2 + "\n")
    assert "back to position" in say(child, "/undo")
    assert say(child, q3).startswith(a3 + "\n")
    assert say(child, "/regen").startswith(a3 + "\n")  # same state, greedy: same answer

    assert say(child, "/set temperature 0.5").strip() == "temperature = 0.5"
    assert "bad value for top_p" in say(child, "/set top_p 7")
    shown = say(child, "/show")
    assert re.search(r"temperature\s+0\.5", shown) and re.search(r"position\s+\d+ tokens", shown)
    assert "unknown command" in say(child, "/frobnicate")
    assert "/regen" in say(child, "/help")

    child.sendline("/bye")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert q1 in history_path().read_text()  # persistent input history


def test_multiline_message(it_file, tokenizer_path):
    child = spawn(str(it_file), "--temperature", "0", "--max-tokens", "12")
    child.sendline('"""line one')
    child.expect_exact("... ")
    out = say(child, 'line two"""')
    assert out.startswith(greedy_answers(tokenizer_path, ["line one\nline two"])[0] + "\n")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_ctrl_c_stops_the_answer_and_keeps_the_session(it_file):
    # raw mode with this seed samples thousands of tokens before eos: the answer is still running at Ctrl-C
    child = spawn(str(it_file), "--raw", "--temperature", "1", "--seed", "5", "--min-p", "0.2",
                  "--max-tokens", "1000000")
    child.sendline("The quick brown")
    child.expect_exact("The quick brown\r\n")  # the echo
    # answer text is streaming (readline may first switch bracketed paste off: ESC [?2004l)
    child.expect([r"\x1b\[\?2004l\r?[^\x1b\r\n]", r"^[^\x1b\r\n]"])
    child.sendintr()
    child.expect_exact("[stopped]")
    child.expect_exact(PROMPT)
    assert say(child, "/set max_tokens 5").strip() == "max_tokens = 5"
    assert "[cut at max_tokens = 5]" in say(child, " fox")  # the session goes on
    child.sendintr()  # at the prompt: a hint, not an exit
    child.expect_exact("Ctrl-D or /bye to exit")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_save_and_load_in_the_repl(it_file, tokenizer_path, tmp_path):
    child = spawn(str(it_file), "--temperature", "0", "--max-tokens", "12")
    a1, a2 = greedy_answers(tokenizer_path, ["Hello there", "The quick brown fox"])
    assert say(child, "Hello there").startswith(a1 + "\n")
    saved = tmp_path / "chat.state"
    assert "saved 2 turns" in say(child, f"/save {saved}")
    say(child, "/clear")
    assert "resumed 2 turns" in say(child, f"/load {saved}")
    assert say(child, "The quick brown fox").startswith(a2 + "\n")  # as if never cleared
    assert "rgchat: error:" in say(child, f"/load {tmp_path / 'missing.state'}")  # the session goes on
    child.sendline("/bye")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
