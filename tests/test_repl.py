"""The interactive chat, driven through a pseudo-terminal as a user would drive it."""

import os
import re
import stat
import sys

import pexpect
import pytest

from conftest import CYCLES, tiny_model, write_hf_folder
from rgchat import statefile
from rgchat.chat import ChatSession
from rgchat.checkpoint import convert
from rgchat.repl import history_path
from rgchat.generate import text
from rgchat.settings import Settings
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
    s = ChatSession(tiny_model(CYCLES, seed=MODEL_SEED), Tokenizer(tokenizer_path),
                    Settings(temperature=0, max_tokens=12), template=True)
    out = []
    for i, q in enumerate(questions):
        out.append(text(s.ask(q)))
        if i == undo_after:
            s.undo()
    return out


def spawn(*args: str) -> pexpect.spawn:
    env = {**os.environ, "TERM": "dumb", "NO_COLOR": "1"}
    child = pexpect.spawn(sys.executable, ["-m", "rgchat", "run", *args], env=env, encoding="utf-8",
                          codec_errors="replace", timeout=60, dimensions=(40, 200))
    child.expect_exact(PROMPT)
    return child


def end(child: pexpect.spawn, line: str | None = "/bye") -> str:
    """Leave the chat with `line` (None: Ctrl-D) and check that it exits 0; returns what it printed last."""
    if line is None:
        child.sendeof()
    else:
        child.sendline(line)
    child.expect(pexpect.EOF)
    tail = child.before
    child.close()
    assert child.exitstatus == 0, tail
    assert "rgchat: error:" not in tail and "Traceback" not in tail, tail
    return tail


def flat(text: str) -> str:
    """`text` with its line breaks and runs of spaces as one space (the console wraps long notes)."""
    return " ".join(text.split())


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
    end(child)
    assert q1 in history_path().read_text()  # persistent input history


def test_help_lists_the_settings_set_takes(it_file):
    child = spawn(str(it_file))
    accepted = flat(say(child, "/set frobnicate 1")).split("one of: ", 1)[1]  # the names /set checks against
    assert "temperature" in accepted and accepted in flat(say(child, "/help"))
    end(child)


def test_multiline_message(it_file, tokenizer_path):
    child = spawn(str(it_file), "--temperature", "0", "--max-tokens", "12")
    child.sendline('"""line one')
    child.expect_exact("... ")
    out = say(child, 'line two"""')
    assert out.startswith(greedy_answers(tokenizer_path, ["line one\nline two"])[0] + "\n")
    end(child, None)


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
    end(child, None)


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
    end(child)


def test_refusals_bad_values_slash_messages_and_undoing_clear(it_file, tokenizer_path, tmp_path):
    """One chat: /save refuses a FIFO and a folder, /set refuses NaN and a seed too large, /set top_p 0 samples
    (the likeliest token only: the greedy answer), //TEXT is a message, /undo brings back what /clear dropped."""
    q1, q2, q3, slash = "Hello there", "The quick brown fox", "Tell me more", "/etc is a path"
    a1, a2, a3 = greedy_answers(tokenizer_path, [q1, q2, q3])
    a_slash, a_double = greedy_answers(tokenizer_path, [slash])[0], greedy_answers(tokenizer_path, ["/" + slash])[0]
    assert a2 != greedy_answers(tokenizer_path, [q2])[0]  # an /undo that failed would show
    assert a_slash != a_double  # so would a //TEXT sent as is
    folder = tmp_path / "targets"
    folder.mkdir()
    fifo = folder / "fifo"
    os.mkfifo(fifo)
    child = spawn(str(it_file), "--temperature", "0", "--max-tokens", "12")

    for target in (fifo, folder):
        out = flat(say(child, f"/save {target}"))  # one line, wrapped by the console
        assert out.startswith(f"rgchat: error: {target}: ") and out.count("rgchat: error:") == 1, out
        assert out.endswith("; refusing to write over it"), out
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert os.listdir(folder) == ["fifo"]  # nothing written beside it either
    assert say(child, q1).startswith(a1 + "\n")  # the chat goes on

    assert "/undo brings the last one back" in flat(say(child, "/clear"))
    assert "back to position" in say(child, "/undo")
    assert say(child, q2).startswith(a2 + "\n")  # as if q1 and q2 were one conversation

    assert say(child, "/set temperature 1").strip() == "temperature = 1.0"
    assert say(child, "/set top_p 0").strip() == "top_p = 0.0"
    assert say(child, q3).startswith(a3 + "\n")  # sampled, from the likeliest token alone
    for name, value in (("temperature", "nan"), ("seed", "99999999999999999999999")):
        out = say(child, f"/set {name} {value}")
        assert f"bad value for {name}" in out and len(out.strip().splitlines()) == 1, out
        assert "Traceback" not in out
    shown = say(child, "/show")
    assert re.search(r"temperature\s+1\.0\b", shown) and re.search(r"top_p\s+0\.0\b", shown), shown
    assert re.search(r"seed\s+None\b", shown) and re.search(r"turns\s+6\b", shown), shown

    say(child, "/clear")
    assert say(child, "/" + slash).startswith(a_slash + "\n")  # a message, in a fresh conversation
    assert any(line.startswith("//") for line in say(child, "/help").splitlines())
    end(child)


def test_state_file_with_clear_save_and_load(it_file, tokenizer_path, tmp_path):
    """--state A: A is created private; /clear leaves A as it is; /save B copies; /load B moves later turns to
    B, and A keeps exactly what it held."""
    a, b = tmp_path / "a.state", tmp_path / "b.state"
    q1, q2, q3 = "Hello there", "The quick brown fox", "Tell me more"
    a1, a2 = greedy_answers(tokenizer_path, [q1, q2])
    a3 = greedy_answers(tokenizer_path, [q1, q3])[1]  # B holds the conversation after q1
    assert a3 != greedy_answers(tokenizer_path, [q1, q2, q3])[2]
    child = spawn(str(it_file), "--temperature", "0", "--max-tokens", "12", "--state", str(a))
    assert not a.exists()
    assert say(child, q1).startswith(a1 + "\n")
    assert stat.S_IMODE(a.stat().st_mode) == 0o600
    after_q1 = a.read_bytes()

    assert f"{a} keeps it until the next turn" in flat(say(child, "/clear"))
    assert a.read_bytes() == after_q1
    assert "back to position" in say(child, "/undo")
    saved = flat(say(child, f"/save {b}"))
    assert "saved 2 turns" in saved and f"later turns are still saved to {a}" in saved, saved
    assert stat.S_IMODE(b.stat().st_mode) == 0o600
    assert say(child, q2).startswith(a2 + "\n")
    after_q2 = a.read_bytes()
    assert after_q2 != after_q1 and len(statefile.load(a).transcript) == 4
    b_before = b.read_bytes()

    loaded = flat(say(child, f"/load {b}"))
    assert "resumed 2 turns" in loaded and f"later turns are saved to {b}" in loaded, loaded
    assert say(child, q3).startswith(a3 + "\n")
    assert b.read_bytes() != b_before
    assert [t.text for t in statefile.load(b).transcript] == [q1, a1, q3, a3]
    assert a.read_bytes() == after_q2  # A is no longer written
    assert not history_path().exists()
    end(child)
    assert stat.S_IMODE(history_path().stat().st_mode) == 0o600  # the input history is private
    assert q3 in history_path().read_text()


