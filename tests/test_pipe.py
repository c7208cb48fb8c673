"""`rgchat run` in pipes and scripts: stdout holds exactly the answers, everything else goes to stderr."""

import io
import json
import os
import signal
import subprocess
import sys

import pytest

from conftest import CYCLES, run_cli, tiny_model, write_hf_folder
from rgchat import pipe
from rgchat.chat import ChatSession
from rgchat.checkpoint import convert
from rgchat.errors import RGChatError, UsageError
from rgchat.sampling import Sampler
from rgchat.tokenizer import Tokenizer

MODEL_SEED = 31


@pytest.fixture(scope="module")
def it_file(tmp_path_factory, tokenizer_path):
    """An instruction-tuned (by name) tiny model, converted once to an f32 model file."""
    folder = write_hf_folder(tiny_model(CYCLES, seed=MODEL_SEED), tmp_path_factory.mktemp("m") / "tiny-it",
                             tokenizer_path)
    return convert(folder, "f32", tmp_path_factory.mktemp("f") / "tiny-it.safetensors")


def answers(tokenizer_path, questions, template=True, max_tokens=12, **kwargs):
    """What a greedy in-process session answers, turn after turn."""
    s = ChatSession(tiny_model(CYCLES, seed=MODEL_SEED), Tokenizer(tokenizer_path), Sampler(temperature=0),
                    template=template, max_tokens=max_tokens, **kwargs)
    return ["".join(s.ask(q)) for q in questions]


GREEDY = ("--temperature", "0", "--max-tokens", "12")


def test_stdout_holds_exactly_the_answer(it_file, tokenizer_path):
    result = run_cli("run", str(it_file), *GREEDY, stdin="Hello there")
    assert result.returncode == 0, result.stderr
    assert result.stdout == answers(tokenizer_path, ["Hello there"])[0] + "\n"
    assert "\x1b" not in result.stdout + result.stderr
    # PROMPT and stdin together: PROMPT, a blank line, then stdin
    both = run_cli("run", str(it_file), "Summarize:", *GREEDY, stdin="The quick brown fox")
    assert both.stdout == answers(tokenizer_path, ["Summarize:\n\nThe quick brown fox"])[0] + "\n"


def test_lines_answers_each_line_in_one_conversation(it_file, tokenizer_path):
    questions = ["Hello there", "The quick brown fox", "And then?"]
    result = run_cli("run", str(it_file), "--lines", *GREEDY, stdin="\n".join(questions[:2]) + "\n\n" + questions[2])
    assert result.returncode == 0, result.stderr
    assert result.stdout == "".join(a + "\n" for a in answers(tokenizer_path, questions))


def test_stats_go_to_stderr(it_file, tokenizer_path):
    result = run_cli("run", str(it_file), "Hello there", *GREEDY, "--stats-json", "--verbose")
    assert result.returncode == 0
    assert result.stdout == answers(tokenizer_path, ["Hello there"])[0] + "\n"
    stats = json.loads(result.stderr.strip().splitlines()[-1])
    assert stats["prompt_tokens"] == 1 + len(Tokenizer(tokenizer_path).chat_prompt("Hello there"))
    assert stats["generated_tokens"] <= 12 and stats["stop_reason"] in ("max_tokens", "end_of_turn", "eos")
    assert stats["peak_memory_bytes"] > 0 and stats["ttft_s"] > 0
    assert "tokens in" in result.stderr  # the human line of --verbose


def test_stop_strings_and_seeded_sampling(it_file, tokenizer_path):
    full = answers(tokenizer_path, ["Hello there"], max_tokens=30)[0]
    stop = full[4:6]
    result = run_cli("run", str(it_file), "Hello there", "--temperature", "0", "--max-tokens", "30", "--stop", stop)
    assert result.stdout == full[:full.index(stop)] + "\n"
    sampled = [run_cli("run", str(it_file), "Hello there", "--seed", "3", "--temperature", "1.2").stdout
               for _ in range(2)]
    assert sampled[0] == sampled[1]
    other = run_cli("run", str(it_file), "Hello there", "--seed", "4", "--temperature", "1.2").stdout
    assert other != sampled[0]


def test_nothing_to_answer_is_a_usage_error(it_file):
    for stdin in ("", "  \n"):
        result = run_cli("run", str(it_file), stdin=stdin)
        assert result.returncode == 2 and result.stdout == ""
        assert result.stderr.startswith("rgchat: error: nothing to answer")


def test_invalid_utf8_is_replaced_with_a_warning(it_file, tokenizer_path):
    result = run_cli("run", str(it_file), "--raw", *GREEDY, stdin=b"The quick \xff brown")
    assert result.returncode == 0, result.stderr
    expected = answers(tokenizer_path, ["The quick \ufffd brown"], template=False)[0]
    assert result.stdout.decode() == expected + "\n"
    assert b"not valid UTF-8" in result.stderr and b"Traceback" not in result.stderr


def test_huge_input_is_refused(monkeypatch):
    monkeypatch.setattr(pipe, "MAX_INPUT_BYTES", 100)
    with pytest.raises(RGChatError, match="larger than"):
        pipe.read_prompt(None, io.BytesIO(b"x" * 101), io.StringIO())
    assert pipe.read_prompt("Q", io.BytesIO(b"x" * 100), io.StringIO()) == "Q\n\n" + "x" * 100
    with pytest.raises(UsageError):
        pipe.read_prompt(None, None, io.StringIO())


def test_ctrl_c_stops_the_answer_and_exits_130(it_file):
    """SIGINT while answering: the partial answer is kept on stdout, then exit 130."""
    env = {**os.environ, "NO_COLOR": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "rgchat", "run", str(it_file), "--raw", "The quick brown",
                             "--max-tokens", "1000000", "--temperature", "1", "--seed", "5", "--min-p", "0.2",
                             "--stats-json"],  # this seed samples 2479 tokens before eos: seconds
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    first = proc.stdout.read(1)  # answering has begun
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert first and (first + out).endswith(b"\n")
    assert b"interrupted" in err and b"Traceback" not in err
    assert json.loads(err.splitlines()[0])["stop_reason"] == "interrupted"
