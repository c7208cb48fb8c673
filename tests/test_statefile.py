"""State files: resuming equals never stopping, saves are stable and atomic, and every kind of wrong or damaged
file is refused with one clear line while the file stays untouched."""

import json
import os
import stat
import struct
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from conftest import CYCLES, run_cli, tiny_model, write_hf_folder
from test_modelfile import DERANDOMIZE, MAX_EXAMPLES
from rgchat import files, statefile
from rgchat.chat import ChatSession
from rgchat.checkpoint import convert
from rgchat.errors import RGChatError
from rgchat.generate import text
from rgchat.loader import LoadedModel
from rgchat.settings import Settings
from rgchat.tokenizer import Tokenizer

MODEL_SEED = 31
QUESTIONS = ["Hello there", "The quick brown fox", "And then?"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tokenizer_path):
    return write_hf_folder(tiny_model(CYCLES, seed=MODEL_SEED), tmp_path_factory.mktemp("m") / "tiny-it",
                           tokenizer_path)


@pytest.fixture(scope="module")
def f32_file(folder, tmp_path_factory):
    return convert(folder, "f32", tmp_path_factory.mktemp("f") / "tiny-it.safetensors")


def loaded_model(tokenizer_path, seed=MODEL_SEED, precision="f32") -> LoadedModel:
    return LoadedModel(tiny_model(CYCLES, seed=seed), Tokenizer(tokenizer_path), "tiny-it", precision,
                       f"weights-{seed}", "tokenizer", "tiny-it")


def new_session(loaded: LoadedModel, temperature=0.0, seed=None) -> ChatSession:
    return ChatSession(loaded.model, loaded.tokenizer, Settings(temperature=temperature, seed=seed, max_tokens=8),
                       template=True)


def test_resuming_equals_never_stopping(f32_file, tmp_path):
    """Three turns in one process, and the same three turns in three processes through --state, greedy and
    seeded sampling; the answers are cut by --max-tokens."""
    for sampling in (["--temperature", "0"], ["--temperature", "1", "--seed", "1"]):
        args = ["run", str(f32_file), "--max-tokens", "8", *sampling]
        one = run_cli(*args, "--lines", stdin="\n".join(QUESTIONS) + "\n")
        assert one.returncode == 0, one.stderr
        state = tmp_path / f"chat{len(sampling)}.state"
        separate = []
        for q in QUESTIONS:
            result = run_cli(*args, q, "--state", str(state), "--stats-json")
            assert result.returncode == 0, result.stderr
            assert json.loads(result.stderr.splitlines()[-1])["stop_reason"] == "max_tokens"
            separate.append(result.stdout)
        assert "".join(separate) == one.stdout
        assert len(set(separate)) == 3


def test_save_load_save_is_identical(tokenizer_path, tmp_path):
    loaded = loaded_model(tokenizer_path)
    s = new_session(loaded, temperature=1.0, seed=5)
    s.system = "Be brief."
    for q in QUESTIONS[:2]:
        text(s.ask(q))
    first, second = tmp_path / "a.state", tmp_path / "b.state"
    statefile.save(first, s, loaded.identity())
    resumed = new_session(loaded, temperature=1.0, seed=5)  # sampling settings are the session's own
    statefile.restore(resumed, statefile.load(first, loaded.identity()))
    statefile.save(second, resumed, loaded.identity())
    a, b = (load_tensors(p.read_bytes()) for p in (first, second))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    meta_a, meta_b = (statefile._read_metadata(p.read_bytes()) for p in (first, second))
    ignore = {"created", "payload_sha256"}
    assert {k: v for k, v in meta_a.items() if k not in ignore} == {k: v for k, v in meta_b.items() if k not in ignore}
    # the resumed session goes on exactly as the original: same state, same random stream
    assert resumed.system == "Be brief." and resumed.transcript == s.transcript
    assert text(resumed.ask(QUESTIONS[2])) == text(s.ask(QUESTIONS[2]))


def test_ring_buffers_store_only_filled_slots(saved_file, tokenizer_path):
    tensors = load_tensors(saved_file.read_bytes())
    saved = statefile.load(saved_file)
    assert tensors["layers.2.k"].shape[0] == saved.state.pos < CYCLES.window
    s = new_session(loaded_model(tokenizer_path))  # the same conversation again, in memory
    text(s.ask("Hello there"))
    assert all(torch.equal(x, y) for x, y in zip(saved.state.tensors(), s.state.tensors(), strict=True))


def test_replay_rebuilds_the_state_for_another_model(tokenizer_path, tmp_path):
    loaded = loaded_model(tokenizer_path)
    s = new_session(loaded)
    for q in QUESTIONS[:2]:
        text(s.ask(q))
    path = tmp_path / "c.state"
    statefile.save(path, s, loaded.identity())
    original_next = text(s.ask(QUESTIONS[2]))

    saved = statefile.load(path)
    replayed = new_session(loaded_model(tokenizer_path))  # the same tokenizer: the turns' own token ids
    statefile.replay(saved, replayed, same_tokenizer=True)
    assert replayed.state.pos == saved.state.pos and replayed.transcript == saved.transcript
    assert text(replayed.ask(QUESTIONS[2])) == original_next
    # Another tokenizer encodes the texts again: user turns come out the same; sampled answers need not
    # (random byte tokens decode lossily), so only the structure is checked.
    encoded = new_session(loaded_model(tokenizer_path))
    statefile.replay(saved, encoded, same_tokenizer=False)
    assert [t.text for t in encoded.transcript] == [t.text for t in saved.transcript]
    assert [t.ids for t in encoded.transcript[::2]] == [t.ids for t in saved.transcript[::2]]
    assert encoded.state.pos == sum(len(t.ids) for t in encoded.transcript)

    other = loaded_model(tokenizer_path, seed=7)
    with pytest.raises(RGChatError, match="state replay"):
        statefile.load(path, other.identity())
    with pytest.raises(RGChatError, match="in tokenizer. To continue"):
        statefile.load(path, {**loaded.identity(), "tokenizer_sha256": "another"})
    moved = new_session(other)
    statefile.replay(statefile.load(path), moved, same_tokenizer=True)
    statefile.save(path, moved, other.identity())
    assert statefile.load(path, other.identity()).transcript == moved.transcript


def test_cli_refusals_leave_the_file_unchanged(folder, f32_file, tmp_path):
    state = tmp_path / "c.state"
    assert run_cli("run", str(f32_file), "Hello there", "--state", str(state), "--temperature", "0",
                   "--max-tokens", "4").returncode == 0
    before = state.read_bytes()

    def refused(*args, match):
        result = run_cli("run", *args, "x", "--state", str(state))
        assert result.returncode == 1 and result.stdout == "", result.stderr
        assert result.stderr.startswith("rgchat: error:") and match in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
        assert state.read_bytes() == before

    int8 = convert(folder, "int8", tmp_path / "tiny-it-int8.safetensors")
    refused(str(int8), match="state replay")  # another precision
    other = convert(write_hf_folder(tiny_model(CYCLES, seed=8), tmp_path / "other-it", folder / "tokenizer.model"),
                    "f32", tmp_path / "other.safetensors")
    refused(str(other), match="weights")
    refused(str(f32_file), "--raw", match="chat conversation")

    shown = run_cli("state", "show", str(state))
    assert shown.returncode == 0 and "[user]\nHello there" in shown.stdout and "position:" in shown.stdout

    replayed = run_cli("state", "replay", str(state), "--model", str(int8), "-o", str(tmp_path / "r.state"))
    assert replayed.returncode == 0, replayed.stderr
    assert run_cli("run", str(int8), "more", "--state", str(tmp_path / "r.state"), "--max-tokens", "4").returncode == 0
    assert state.read_bytes() == before


def rewrite(path, mutate_metadata):
    """A checksum-valid file with changed metadata (what a newer or foreign writer could produce)."""
    data = path.read_bytes()
    tensors, metadata = load_tensors(data), statefile._read_metadata(data)
    mutate_metadata(metadata)
    metadata["payload_sha256"] = statefile.payload_sha256(metadata, tensors)
    path.write_bytes(save_tensors(tensors, metadata))


@pytest.fixture
def saved_file(tokenizer_path, tmp_path):
    loaded = loaded_model(tokenizer_path)
    s = new_session(loaded)
    text(s.ask("Hello there"))
    path = tmp_path / "c.state"
    statefile.save(path, s, loaded.identity())
    return path


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_bytes(p.read_bytes()[:-100]), "damaged state file"),
    (lambda p: p.write_bytes(p.read_bytes()[:5]), "not an rgchat state file"),
    (lambda p: p.write_bytes(b""), "no conversation has been saved in it"),
    (lambda p: p.write_bytes(bytearray(p.read_bytes())[:-1] + bytes([p.read_bytes()[-1] ^ 1])), "checksum"),
    (lambda p: rewrite(p, lambda m: m.update(format_version="2")), "newer rgchat"),
    (lambda p: rewrite(p, lambda m: m.update(format="something-else")), "not an rgchat state file"),
    (lambda p: rewrite(p, lambda m: m.update(pos="3")), "inconsistent state file"),
    (lambda p: p.write_bytes(save_tensors({"x": torch.zeros(2)}, {"format": "pt"})), "not an rgchat state file"),
    (lambda p: p.write_text("not even binary"), "not an rgchat state file"),
], ids=["truncated", "stub", "empty", "flipped-bit", "newer", "foreign-format", "bad-position", "other-safetensors",
        "text"])
def test_damaged_files_are_refused(saved_file, damage, message):
    damage(saved_file)
    with pytest.raises(RGChatError, match=message):
        statefile.load(saved_file)


def test_a_model_file_is_not_a_state_file(f32_file):
    with pytest.raises(RGChatError, match="not an rgchat state file"):
        statefile.load(f32_file)


def test_failed_write_keeps_the_old_file(saved_file, tokenizer_path, monkeypatch):
    before = saved_file.read_bytes()
    loaded = loaded_model(tokenizer_path)
    s = new_session(loaded)

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", full_disk)
    with pytest.raises(RGChatError, match="No space left"):
        statefile.save(saved_file, s, loaded.identity())
    assert saved_file.read_bytes() == before
    assert [p.name for p in saved_file.parent.iterdir()] == [saved_file.name]  # no temp file left behind


@settings(max_examples=MAX_EXAMPLES, derandomize=DERANDOMIZE, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_files_never_crash_and_are_never_accepted_damaged(saved_file, data):
    original = saved_file.read_bytes()
    reference = statefile.load(saved_file)
    fuzzed = saved_file.with_name("fuzzed.state")
    mutated = bytearray(original)
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["flip", "truncate", "insert", "header"]))
        if kind == "truncate":
            mutated = mutated[:data.draw(st.integers(0, len(mutated)))]
        elif not mutated:
            continue
        elif kind == "header":  # aim at the JSON header, where parsing is most delicate
            (length,) = struct.unpack("<Q", bytes(mutated[:8]).ljust(8, b"\0"))
            i = data.draw(st.integers(0, max(0, min(len(mutated), 8 + length) - 1)))
            mutated[i] = data.draw(st.integers(0, 255))
        elif kind == "flip":
            i = data.draw(st.integers(0, len(mutated) - 1))
            mutated[i] ^= 1 << data.draw(st.integers(0, 7))
        else:
            i = data.draw(st.integers(0, len(mutated)))
            mutated[i:i] = data.draw(st.binary(min_size=1, max_size=8))
    fuzzed.write_bytes(bytes(mutated))
    try:
        got = statefile.load(fuzzed)
    except RGChatError:
        return
    # accepted: then it must be the same conversation (only insignificant header bytes may have changed)
    assert got.transcript == reference.transcript and got.metadata == reference.metadata
    assert all(torch.equal(x, y) for x, y in zip(got.state.tensors(), reference.state.tensors(), strict=True))
    assert torch.equal(got.rng, reference.rng)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_states_move_between_cuda_and_cpu(tokenizer_path, tmp_path):
    cpu = loaded_model(tokenizer_path)
    cuda = LoadedModel(tiny_model(CYCLES, seed=MODEL_SEED).to("cuda"), cpu.tokenizer, "tiny-it", "f32",
                       cpu.weights_sha256, cpu.tokenizer_sha256, "tiny-it")
    on_cuda = new_session(cuda)
    text(on_cuda.ask(QUESTIONS[0]))
    statefile.save(tmp_path / "c.state", on_cuda, cuda.identity())
    on_cpu = new_session(cpu)
    statefile.restore(on_cpu, statefile.load(tmp_path / "c.state", cpu.identity()))
    assert on_cpu.state.tensors()[0].device.type == "cpu"
    back = new_session(cuda)
    statefile.restore(back, statefile.load(tmp_path / "c.state", cuda.identity()))
    cpu_answer, cuda_answer = text(on_cpu.ask(QUESTIONS[1])), text(back.ask(QUESTIONS[1]))
    assert cpu_answer and cpu_answer == cuda_answer


def test_a_conversation_open_in_one_process_is_refused_in_another(f32_file, tmp_path):
    """Two real processes on one state file: the second is refused at once, with one line, and the first
    keeps every one of its turns."""
    state = tmp_path / "c.state"
    state.touch()  # an empty (touched) file starts a new conversation
    env = {**os.environ, "NO_COLOR": "1"}
    first = subprocess.Popen([sys.executable, "-m", "rgchat", "run", str(f32_file), "--state", str(state), "--lines",
                              "--temperature", "0", "--max-tokens", "4"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        first.stdin.write(b"Hello there\n")
        first.stdin.flush()
        first.stdout.readline()  # its first answer: the file is open and written by now
        second = run_cli("run", str(f32_file), "The quick brown fox", "--state", str(state))
        assert second.returncode == 1 and second.stdout == "", second.stderr
        assert "open in another rgchat process" in second.stderr and f"pid {first.pid}" in second.stderr
        assert "Traceback" not in second.stderr
        first.stdin.write(b"And then?\n")
    finally:
        out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    saved = statefile.load(state)
    assert [t.text for t in saved.transcript[::2]] == ["Hello there", "And then?"]
    assert not (tmp_path / ".c.state.lock").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.state"]


def test_a_file_changed_by_another_program_is_never_overwritten(tokenizer_path, tmp_path):
    loaded = loaded_model(tokenizer_path)
    s = new_session(loaded)
    path = tmp_path / "c.state"
    bound = statefile.StateFile(path)
    try:
        assert bound.read() is None
        text(s.ask("Hello there"))
        bound.write(s, loaded.identity())
        path.write_bytes(b"edited by hand")  # someone else writes the file while the session runs
        text(s.ask("And then?"))
        with pytest.raises(RGChatError, match="changed since rgchat last read or wrote it") as refusal:
            bound.write(s, loaded.identity())
        assert path.read_bytes() == b"edited by hand"
        elsewhere = tmp_path / "c.conflict-1.state"
        assert str(elsewhere) in str(refusal.value) and bound.path == elsewhere
        assert len(statefile.load(elsewhere).transcript) == 4
        text(s.ask("More"))
        bound.write(s, loaded.identity())  # later turns go to the new file
        assert len(statefile.load(elsewhere).transcript) == 6
    finally:
        bound.close()
    assert path.read_bytes() == b"edited by hand"


def test_a_crafted_size_is_refused_before_anything_is_allocated(saved_file):
    def huge_window(metadata):
        identity = json.loads(metadata["model"])
        identity["config"]["window"] = 10**9
        metadata["model"] = json.dumps(identity)

    rewrite(saved_file, huge_window)
    with pytest.raises(RGChatError, match="inconsistent state file .*state would take"):
        statefile.load(saved_file)


def test_state_files_are_written_safely_through_the_cli(f32_file, tmp_path):
    """A state file behind a symlink is updated through the link with its mode kept; a state path that
    cannot be written is refused before the model runs; a FIFO is never read or replaced."""
    real, link = tmp_path / "real.state", tmp_path / "link.state"
    args = ["--temperature", "0", "--max-tokens", "4"]
    assert run_cli("run", str(f32_file), "Hello there", "--state", str(real), *args).returncode == 0
    assert stat.S_IMODE(real.stat().st_mode) == 0o600  # a new state file is private
    real.chmod(0o640)
    link.symlink_to(real.name)
    result = run_cli("run", str(f32_file), "And then?", "--state", str(link), *args)
    assert result.returncode == 0, result.stderr
    assert link.is_symlink() and os.readlink(link) == "real.state"
    assert stat.S_IMODE(real.stat().st_mode) == 0o640
    assert len(statefile.load(real).transcript) == 4

    fifo = tmp_path / "fifo.state"
    os.mkfifo(fifo)
    not_a_folder = tmp_path / "real.state" / "c.state"
    for target, message in [(fifo, "a FIFO; refusing to write over it"), (not_a_folder, "cannot write it (Not a directory)")]:
        refused = run_cli("run", str(f32_file), "Hello there", "--state", str(target), *args)
        assert refused.returncode == 1 and refused.stdout == "", refused.stderr  # no answer was given
        assert message in refused.stderr and "Traceback" not in refused.stderr
    assert stat.S_ISFIFO(fifo.stat().st_mode)
