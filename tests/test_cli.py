"""The command line, run as users run it: a separate process, stdout for the answer, stderr for errors."""


import pytest

from conftest import CYCLES, greedy_tokens, run_cli as rgchat, tiny_model, write_hf_folder, write_official
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
