"""The command line, run as users run it: a separate process, stdout for the answer, stderr for errors."""

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import CYCLES, greedy_tokens, run_cli as rgchat, tiny_model, write_hf_folder, write_official
from rgchat import __version__, statefile
from rgchat.cli import app
from rgchat.quant import DEFAULT_PRECISION
from rgchat.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tokenizer_path):
    return write_hf_folder(tiny_model(CYCLES, seed=31), tmp_path_factory.mktemp("m") / "tiny", tokenizer_path)


def expected_text(folder, ids, n, stop_ids):
    model = tiny_model(CYCLES, seed=31)
    tok = Tokenizer(folder / "tokenizer.model")
    return tok.decode([t for t in greedy_tokens(model, ids, n, stop_ids) if t not in stop_ids])


def test_run_raw_streams_the_greedy_continuation(hf_dir):
    tok = Tokenizer(hf_dir / "tokenizer.model")
    result = rgchat("run", str(hf_dir), "The quick brown", "--raw", "--max-tokens", "20", "--device", "cpu", "--temperature", "0",
                    "--precision", "f32")
    assert result.returncode == 0, result.stderr
    expected = expected_text(hf_dir, [tok.bos_id] + tok.encode("The quick brown"), 20, {tok.eos_id})
    assert len(expected) > 5
    assert result.stdout == expected + "\n"
    assert "Traceback" not in result.stderr


def test_run_chat_template_for_it_models(tmp_path, hf_dir, tokenizer_path):
    it_dir = write_hf_folder(tiny_model(CYCLES, seed=31), tmp_path / "tiny-it", tokenizer_path)
    tok = Tokenizer(tokenizer_path)
    result = rgchat("run", str(it_dir), "Hello there", "--max-tokens", "15", "--precision", "f32", "--temperature", "0")
    assert result.returncode == 0, result.stderr
    ids = [tok.bos_id] + tok.chat_prompt("Hello there")
    assert result.stdout == expected_text(it_dir, ids, 15, {tok.eos_id, tok.end_of_turn_id}) + "\n"
    # --raw overrides the -it default
    raw = rgchat("run", str(it_dir), "Hello there", "--raw", "--max-tokens", "15", "--precision", "f32", "--temperature", "0")
    assert raw.stdout == expected_text(it_dir, [tok.bos_id] + tok.encode("Hello there"), 15, {tok.eos_id}) + "\n"


def test_official_pt_runs_the_same(tmp_path, hf_dir, tokenizer_path):
    pt = write_official(tiny_model(CYCLES, seed=31), tmp_path / "kaggle", tokenizer_path)
    a = rgchat("run", str(pt), "fox", "--raw", "--max-tokens", "10", "--temperature", "0")
    b = rgchat("run", str(hf_dir), "fox", "--raw", "--max-tokens", "10", "--temperature", "0")
    assert a.returncode == b.returncode == 0
    assert a.stdout == b.stdout


def assert_clean_error(result, code=1):
    assert result.returncode == code, (result.returncode, result.stderr)
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("rgchat: error:")]
    assert len(errors) == 1, result.stderr  # one error line (a progress line may precede it)


def test_bad_inputs_give_one_line_and_exit_1(tmp_path, hf_dir, tokenizer_path):
    assert_clean_error(rgchat("run", str(tmp_path / "missing"), "x"))

    truncated = write_hf_folder(tiny_model(CYCLES), tmp_path / "trunc", tokenizer_path)
    shard = truncated / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    assert_clean_error(rgchat("run", str(truncated), "x"))

    class_pt = tmp_path / "evil" / "model.pt"
    class_pt.parent.mkdir()
    class_pt.write_bytes(b"\x80\x04cos\nsystem\nX\x02\x00\x00\x00lsR.")  # a pickle that would run `ls`
    assert_clean_error(rgchat("run", str(class_pt), "x"))

    unknown = write_hf_folder(tiny_model(CYCLES), tmp_path / "unknown", tokenizer_path)
    (unknown / "config.json").write_text('{"model_type": "mamba"}')
    assert_clean_error(rgchat("run", str(unknown), "x"))

    no_tok = write_hf_folder(tiny_model(CYCLES), tmp_path / "notok", tokenizer_path)
    (no_tok / "tokenizer.model").unlink()
    assert_clean_error(rgchat("run", str(no_tok), "x"))


def test_bad_flags_are_usage_errors(hf_dir):
    assert rgchat("run", str(hf_dir), "x", "--precision", "int3").returncode == 2
    assert rgchat("run", str(hf_dir), "x", "--raw", "--chat").returncode == 2
    assert rgchat("run", str(hf_dir), "x", "--max-tokens", "0").returncode == 2
    assert rgchat("bench", "--shape", "7b").returncode == 2


def test_version_is_the_package_version():
    result = rgchat("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"rgchat {__version__}\n"
    pyproject = pytest.importorskip("setuptools.config.pyprojecttoml")
    project = pyproject.read_configuration(Path(__file__).parents[1] / "pyproject.toml")["project"]
    assert project["version"] == __version__


def test_model_and_state_files_record_the_version(tmp_path, tokenizer_path, isolated_store):
    from safetensors import safe_open

    folder = write_hf_folder(tiny_model(CYCLES, seed=31), tmp_path / "tiny-it", tokenizer_path)
    state = tmp_path / "chat.state"
    started = CliRunner().invoke(app, ["run", str(folder), "Hello", "--precision", "f32", "--state", str(state),
                                       "--max-tokens", "2"])
    assert started.exit_code == 0, started.stderr
    [model] = isolated_store.glob("*/model.safetensors")
    for path in (model, state):
        with safe_open(str(path), "pt") as f:
            assert f.metadata()["rgchat_version"] == __version__, path


def help_text(*command: str) -> str:
    """`rgchat COMMAND --help` as one line of words: rich's frames and line breaks taken out."""
    result = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"})
    assert result.exit_code == 0, result.output
    return " ".join(result.stdout.replace("│", " ").split())


def test_help_text_in_brackets_is_not_taken_for_markup():
    assert "Model file to write (by default into the store, as NAME-PRECISION)." in help_text("convert")
    assert "Where to write the rebuilt state (by default it replaces FILE)." in help_text("state", "replay")
    assert "hf:OWNER/REPO, optionally with @REVISION." in help_text("pull")


def test_flags_show_no_value_in_help():
    text = help_text("bench")
    assert "--json Print JSON lines instead of a table." in text
    assert "<bool>" not in text and "<bool>" not in help_text()


def test_help_states_the_defaults_the_code_uses():
    assert f"Weights to download or convert to (by default {DEFAULT_PRECISION})." in help_text("pull")
    for command in (["run"], ["serve"], ["state", "replay"]):
        assert f"convert a checkpoint or Hub model to (by default {DEFAULT_PRECISION})" in help_text(*command)
    assert "Device to run on (by default cpu; auto picks CUDA, then MPS, then CPU)." in help_text("bench")


def test_convert_list_show_rm_and_run_a_converted_file(tmp_path, hf_dir):
    out = tmp_path / "q" / "tiny.safetensors"
    converted = rgchat("convert", str(hf_dir), "--precision", "int8", "-o", str(out))
    assert converted.returncode == 0, converted.stderr
    assert converted.stdout == "" and out.is_file() and (out.parent / "tokenizer.model").is_file()
    answer = rgchat("run", str(out), "fox", "--raw", "--max-tokens", "6")
    assert answer.returncode == 0 and answer.stdout.strip(), answer.stderr
    assert rgchat("run", str(out), "fox", "--precision", "bf16").returncode == 1  # file holds int8

    into_store = rgchat("convert", str(hf_dir), "--precision", "bf16")
    assert into_store.returncode == 0, into_store.stderr
    listed = rgchat("list")
    assert listed.returncode == 0 and listed.stdout.startswith("tiny-bf16\tbf16\t")
    shown = rgchat("show", "tiny-bf16")
    assert "precision: bf16" in shown.stdout and "state size:" in shown.stdout
    assert rgchat("run", "tiny-bf16", "fox", "--raw", "--max-tokens", "4").returncode == 0
    assert rgchat("rm", "tiny-bf16").returncode == 0
    assert rgchat("list").stdout == ""
    assert_clean_error(rgchat("show", "tiny-bf16"))
    assert_clean_error(rgchat("run", "tiny-bf16", "x"))


def test_model_vocab_larger_than_the_tokenizer(tmp_path, tokenizer_path):
    """Checkpoints may pad the embedding past the tokenizer's pieces; those ids must never be generated."""
    from rgchat.config import GriffinConfig

    wide = GriffinConfig(**{**CYCLES.to_dict(), "vocab_size": 640})
    folder = write_hf_folder(tiny_model(wide, seed=33), tmp_path / "padded", tokenizer_path)
    result = rgchat("run", str(folder), "fox", "--raw", "--max-tokens", "30", "--temperature", "1.5", "--seed", "1")
    assert result.returncode == 0, result.stderr


def test_replay_hint_after_a_precision_mismatch_runs(tmp_path, tokenizer_path):
    """A conversation started with a checkpoint folder in f32 is refused by the same folder in int8 (the
    default), with a command that moves it, and that command, as printed, works."""
    folder = write_hf_folder(tiny_model(CYCLES, seed=31), tmp_path / "tiny-it", tokenizer_path)
    state, out = tmp_path / "chat.state", tmp_path / "int8.state"
    runner = CliRunner()  # in this process: neither step needs one of its own
    started = runner.invoke(app, ["run", str(folder), "Hello there", "--precision", "f32", "--state", str(state),
                                  "--max-tokens", "4"])
    assert started.exit_code == 0, started.stderr
    before = state.read_bytes()
    refused = runner.invoke(app, ["run", str(folder), "x", "--state", str(state)])
    assert refused.exit_code == 1, refused.stderr
    errors = [line for line in refused.stderr.splitlines() if line.startswith("rgchat: error:")]
    assert len(errors) == 1 and "rgchat state replay" in errors[0] and "--precision" in errors[0], refused.stderr
    assert state.read_bytes() == before
    command = shlex.split(errors[0].split("run: ", 1)[1])
    assert command[:3] == ["rgchat", "state", "replay"] and command[command.index("--precision") + 1] == "int8"

    replayed = rgchat(*command[1:], "-o", str(out))
    assert replayed.returncode == 0, replayed.stderr
    moved = statefile.load(out)
    assert moved.identity["precision"] == "int8"
    assert [t.text for t in moved.transcript] == [t.text for t in statefile.load(state).transcript]
    assert state.read_bytes() == before


def start(args, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "rgchat", *args], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def f32_file(hf_dir, tmp_path_factory):
    from rgchat.checkpoint import convert

    return convert(hf_dir, "f32", tmp_path_factory.mktemp("f") / "tiny.safetensors")


def test_ctrl_c_is_ignored_once_the_command_is_over(monkeypatch):
    """Python's exit restores the default Ctrl-C action, which would kill rgchat with a signal (no exit code)
    while torch is torn down; once the command has finished, Ctrl-C is ignored instead."""
    from rgchat import __main__ as entry

    previous = signal.getsignal(signal.SIGINT)
    monkeypatch.setattr(sys, "argv", ["rgchat", "--version"])
    try:
        with pytest.raises(SystemExit) as exited:
            entry.main()
        assert exited.value.code in (0, None)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_ctrl_c_during_start_up_exits_130(f32_file):
    args = ["run", str(f32_file), "x", "--max-tokens", "4", "--temperature", "0"]
    answer, _ = start(args).communicate(timeout=120)
    for delay in (0.2, 0.6, 1.2):
        proc = start(args)
        time.sleep(delay)  # importing torch, building the command line, loading the model or answering
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
        assert b"Traceback" not in err and b"Exception ignored" not in err, (delay, err.decode())
        assert proc.returncode in (130, 0), (delay, proc.returncode, err.decode())  # 0: it had answered
        if proc.returncode == 0:
            assert out == answer, delay
        else:  # nothing yet, or (stopped mid-answer) the start of the answer, its line ended
            assert out == b"" or (out.endswith(b"\n") and answer.startswith(out[:-1])), (delay, out)


# Sends SIGINT to this process at one exact point of start-up: when module RGCHAT_TEST_SIGINT_AT="import:NAME"
# starts being imported, or when RGCHAT_TEST_SIGINT_AT="call:MODULE:FUNCTION" is called; creates the file
# RGCHAT_TEST_SIGINT_MARK when it does. Put on PYTHONPATH as sitecustomize, so that it runs before anything.
SIGINT_HOOK = """
import importlib.machinery, os, signal, sys

_kind, _, _where = os.environ.get("RGCHAT_TEST_SIGINT_AT", "").partition(":")


def _interrupt():
    open(os.environ["RGCHAT_TEST_SIGINT_MARK"], "w").close()
    os.kill(os.getpid(), signal.SIGINT)


class _Finder:
    done = False

    def find_spec(self, name, path=None, target=None):
        module, _, function = _where.partition(":")
        if self.done or name != (_where if _kind == "import" else module):
            return None
        self.done = True
        if _kind == "import":
            _interrupt()  # Ctrl-C just as this import begins
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return None
        exec_module = spec.loader.exec_module

        def exec_and_wrap(mod):
            exec_module(mod)
            original = getattr(mod, function, None)
            if callable(original):
                def interrupted(*args, **kwargs):
                    _interrupt()
                    return original(*args, **kwargs)
                setattr(mod, function, interrupted)

        spec.loader.exec_module = exec_and_wrap
        return spec


if _kind:
    sys.meta_path.insert(0, _Finder())
"""


def interrupted_at(where: str, tmp_path: Path, model: Path) -> subprocess.CompletedProcess:
    hook = tmp_path / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(SIGINT_HOOK)
    mark = tmp_path / "interrupted"
    mark.unlink(missing_ok=True)
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")])),
           "RGCHAT_TEST_SIGINT_AT": where, "RGCHAT_TEST_SIGINT_MARK": str(mark)}
    proc = start(["run", str(model), "x", "--max-tokens", "4"], env)
    out, err = proc.communicate(timeout=120)
    if not mark.exists():
        pytest.skip(f"start-up no longer reaches {where}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out.decode(), err.decode())


def test_ctrl_c_while_torch_imports_numpy_exits_130(tmp_path, f32_file):
    result = interrupted_at("import:numpy", tmp_path, f32_file)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 130 and result.stdout == "", (result.returncode, result.stdout, result.stderr)


def test_ctrl_c_while_the_command_line_is_built_exits_130(tmp_path, f32_file):
    result = interrupted_at("call:typer.main:get_command", tmp_path, f32_file)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 130 and result.stdout == "", (result.returncode, result.stdout, result.stderr)
