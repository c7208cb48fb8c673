"""`rgchat run` in pipes and scripts: stdout holds exactly the answers, everything else goes to stderr."""

import io
import json
import os
import signal
import stat
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from conftest import CYCLES, run_cli, tiny_model, write_hf_folder
from rgchat import pipe, statefile
from rgchat.chat import ChatSession
from rgchat.cli import app
from rgchat.checkpoint import convert
from rgchat.errors import RGChatError, UsageError
from rgchat.generate import text
from rgchat.settings import Settings
from rgchat.tokenizer import Tokenizer

MODEL_SEED = 31


@pytest.fixture(scope="module")
def it_file(tmp_path_factory, tokenizer_path):
    """An instruction-tuned (by name) tiny model, converted once to an f32 model file."""
    folder = write_hf_folder(tiny_model(CYCLES, seed=MODEL_SEED), tmp_path_factory.mktemp("m") / "tiny-it",
                             tokenizer_path)
    return convert(folder, "f32", tmp_path_factory.mktemp("f") / "tiny-it.safetensors")


def answers(tokenizer_path, questions, template=True, max_tokens=12, system=None, **settings):
    """What a greedy in-process session answers, turn after turn."""
    s = ChatSession(tiny_model(CYCLES, seed=MODEL_SEED), Tokenizer(tokenizer_path),
                    Settings(temperature=0, max_tokens=max_tokens, **settings), template=template, system=system)
    return [text(s.ask(q)) for q in questions]


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


def invoke(*args: str, stdin: str = ""):
    """`rgchat ARGS` in this process (for what needs no real file descriptors: cheaper than a subprocess)."""
    return CliRunner().invoke(app, list(args), input=stdin)


def run_bytes(args: list, **kwargs) -> subprocess.CompletedProcess:
    """`python -m rgchat ARGS` with stdout and stderr as the caller wants them (stdin is empty)."""
    env = {**os.environ, "NO_COLOR": "1"}
    return subprocess.run([os.fsencode(sys.executable), b"-m", b"rgchat", *map(os.fsencode, args)],
                          stdin=subprocess.DEVNULL, env=env,
                          timeout=120, **kwargs)


def one_error(stderr: str, *words: str) -> str:
    """The one `rgchat: error:` line of `stderr`, which must say `words` (and no traceback anywhere)."""
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("rgchat: error:")]
    assert len(errors) == 1, stderr
    assert all(w in errors[0] for w in words), stderr
    return errors[0]


def test_lines_with_a_prompt_heads_every_line(it_file, tokenizer_path):
    prompt, lines = "Translate:", ["Hello there", "The quick brown fox"]
    expected = answers(tokenizer_path, [f"{prompt}\n\n{line}" for line in lines])
    assert expected != answers(tokenizer_path, lines)
    result = run_cli("run", str(it_file), prompt, "--lines", *GREEDY, stdin=f"{lines[0]}\n \n\n{lines[1]}\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "".join(a + "\n" for a in expected)


def test_lines_with_nothing_to_answer_is_a_usage_error(it_file):
    for stdin in ("", "\n  \n\n"):
        for prompt in ((), ("Translate:",)):
            result = invoke("run", str(it_file), *prompt, "--lines", stdin=stdin)
            assert result.exit_code == 2 and result.stdout == "", (result.exit_code, result.stderr)
            assert one_error(result.stderr, "nothing to answer").startswith("rgchat: error: nothing to answer")


def test_bad_sampling_values_are_usage_errors(it_file):
    for args, name in ((["--seed", "99999999999999999999999"], "seed"), (["--temperature", "nan"], "--temperature"),
                       (["--top-p", "0.5", "--min-p", "nan"], "--min-p")):
        result = invoke("run", str(it_file), "x", *args)
        assert result.exit_code == 2 and result.stdout == "", (args, result.exit_code, result.stderr)
        assert "Traceback" not in result.stderr and isinstance(result.exception, SystemExit), result.exception
        assert len([line for line in result.stderr.splitlines() if name in line]) == 1, result.stderr


def test_invalid_utf8_arguments_and_top_p_0(it_file, tokenizer_path):
    """PROMPT and --system that are not UTF-8 are used with U+FFFD and a warning each; --top-p 0 keeps the
    likeliest token alone, so sampling at temperature 1 gives the greedy answer."""
    expected = answers(tokenizer_path, ["hi\ufffd"], system="x\ufffd")[0]
    assert expected != answers(tokenizer_path, ["hi\ufffd"])[0]  # the system text counts
    result = run_bytes([b"run", os.fsencode(it_file), b"hi\xff", b"--system", b"x\xfe", b"--temperature", b"1",
                        b"--top-p", b"0", b"--max-tokens", b"12"], capture_output=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode() == expected + "\n"
    warnings = [line for line in result.stderr.decode().splitlines() if "not valid UTF-8" in line]
    assert len(warnings) == 2 and "PROMPT" in warnings[0] and "--system" in warnings[1], result.stderr
    assert b"Traceback" not in result.stderr


def test_closed_stdout_is_one_error_line(it_file):
    result = subprocess.run(["sh", "-c", 'exec "$0" -m rgchat run "$1" x --max-tokens 4 >&-', sys.executable,
                             str(it_file)], stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=120,
                            env={**os.environ, "NO_COLOR": "1"})
    assert result.returncode == 1, result.stderr
    one_error(result.stderr, "standard output is closed")


def test_full_stdout_withdraws_the_turn_and_a_new_seed_restarts_the_stream(it_file, tokenizer_path, tmp_path):
    """A saved seeded conversation: a turn whose answer cannot be written (stdout is /dev/full) leaves the file
    as it was; resuming with another --seed continues from that seed; --system no longer applies."""
    (tmp_path / "chats").mkdir()
    state = tmp_path / "chats" / "chat.state"
    sampled = ("--temperature", "1", "--seed", "3", "--max-tokens", "8")
    started = invoke("run", str(it_file), "Hello there", "--state", str(state), *sampled)
    assert started.exit_code == 0 and started.stdout.strip(), started.stderr
    assert stat.S_IMODE(state.stat().st_mode) == 0o600
    before = state.read_bytes()

    with open("/dev/full", "w") as full:
        failed = run_bytes(["run", str(it_file), "The quick brown fox", "--state", str(state), *sampled],
                           stdout=full, stderr=subprocess.PIPE, text=True)
    assert failed.returncode == 1, failed.stderr
    one_error(failed.stderr, "standard output")
    assert state.read_bytes() == before  # the failed turn was withdrawn
    assert os.listdir(state.parent) == ["chat.state"]  # no lock or temp file left behind

    def expected(reseed: bool) -> str:
        s = ChatSession(tiny_model(CYCLES, seed=MODEL_SEED), Tokenizer(tokenizer_path),
                        Settings(temperature=1, seed=7, max_tokens=8), template=True)
        statefile.restore(s, statefile.load(state))
        if reseed:
            s.sampler.reseed(7)
        return text(s.ask("And then?"))

    want = expected(True)
    assert want != expected(False)  # continuing the saved stream would show
    resumed = run_cli("run", str(it_file), "And then?", "--state", str(state), "--temperature", "1", "--seed", "7",
                      "--max-tokens", "8", "--system", "Be brief.")
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout == want + "\n"
    assert [line for line in resumed.stderr.splitlines() if line.strip()] == [
        f"rgchat: warning: --system is not used: the conversation in {state} has begun, and the system text heads "
        "its first turn only"]
    assert [t.text for t in statefile.load(state).transcript][::2] == ["Hello there", "And then?"]
