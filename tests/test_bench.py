import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import CYCLES
from rgchat import config as config_lib
from rgchat.bench import measure_bandwidth, run_bench
from rgchat.bench.memory import drift
from rgchat.bench.plot import plot
from rgchat.cli import app
from rgchat.errors import RGChatError


@pytest.fixture
def tiny_preset(monkeypatch):
    """Register the tiny config as a preset so the real bench code runs in seconds (and read bandwidth over
    64 MiB rather than 1 GiB: these tests check how the figures fit together, not the machine)."""
    import rgchat.bench

    monkeypatch.setitem(config_lib.PRESETS, "2b", CYCLES)
    measure = rgchat.bench.measure_bandwidth
    monkeypatch.setattr(rgchat.bench, "measure_bandwidth", lambda device: measure(device, nbytes=64 << 20))


def test_bench_reports_consistent_figures(tiny_preset):
    result = run_bench("2b", "f32", torch.device("cpu"), prompt_tokens=40, gen_tokens=5)
    assert result["prompt_tokens"] == 40 and result["gen_tokens"] == 5
    assert result["prefill_tok_s"] > 0 and result["decode_tok_s"] > 0
    assert result["weight_bytes_per_token"] > 4 * CYCLES.vocab_size * CYCLES.width
    limit = result["bandwidth_gb_s"] * 1e9 / result["weight_bytes_per_token"]
    assert result["limit_tok_s"] == pytest.approx(limit, rel=1e-2)
    assert result["fraction_of_limit"] == pytest.approx(result["decode_tok_s"] / result["limit_tok_s"], rel=1e-2)
    assert result["peak_rss_bytes"] > 0


def test_bench_json_is_a_line_per_run_on_stdout_and_batch_counts_every_conversation(tiny_preset, tmp_path):
    out = CliRunner().invoke(app, ["bench", "--shape", "2b", "--prompt-tokens", "8", "--gen-tokens", "2", "--json",
                                   "--batch", "1", "--batch", "3", "--plot", str(tmp_path / "batch.png")])
    assert out.exit_code == 0, out.output
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 2 and json.loads(lines[0])["batch"] == 1
    assert (tmp_path / "batch.png").read_bytes().startswith(b"\x89PNG")
    data = json.loads(lines[1])
    assert data["precision"] == "bf16" and data["device"] == "cpu" and data["batch"] == 3
    assert data["decode_tok_s"] == pytest.approx(3 * data["per_conversation_decode_tok_s"], rel=1e-2)
    assert data["fraction_of_limit"] == pytest.approx(data["per_conversation_decode_tok_s"] / data["limit_tok_s"],
                                                      rel=1e-2, abs=1e-4)  # rounded to 4 decimals


def test_batch_is_refused_with_the_single_conversation_measurements():
    with pytest.raises(RGChatError, match="--batch"):
        run_bench("2b", "bf16", torch.device("cpu"), 8, 2, batch=2, compare_hf=True)


def test_bandwidth_is_plausible():
    assert 0.1 < measure_bandwidth(torch.device("cpu"), nbytes=64 << 20, repeats=2) < 10_000


@pytest.mark.parametrize("precision", ["bf16", "int8", "int4"])
def test_bench_saves_and_benches_a_model_file(tiny_preset, tmp_path, precision):
    path = tmp_path / f"random-{precision}.safetensors"
    out = CliRunner().invoke(app, ["bench", "--precision", precision, "--save", str(path)])
    assert out.exit_code == 0, out.output
    shown = CliRunner().invoke(app, ["show", str(path)])
    assert f"precision: {precision}" in shown.stdout
    out = CliRunner().invoke(app, ["bench", "--model", str(path), "--prompt-tokens", "20", "--gen-tokens", "3",
                                   "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    assert data["precision"] == precision and data["shape"] == "random-2b"
    assert data["load_s"] >= 0 and data["decode_tok_s"] > 0
    assert data["startup_s"] is None or data["startup_s"] > 0


def test_state_file_timing_round_trips_a_full_window(tmp_path):
    from rgchat.bench import time_state_file

    row = time_state_file("2b", "int8", tmp_path, repeats=1)
    assert row["tokens"] > 2048 and row["save_ms"] > 0 and row["load_ms"] > 0
    assert row["state_bytes"] < row["file_bytes"] < row["state_bytes"] + (1 << 20)  # the state plus small metadata
    assert list(tmp_path.iterdir()) == []


def test_compare_long_run_sweep_and_plot(tiny_preset, tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    import rgchat.bench

    monkeypatch.setattr(rgchat.bench, "PREFILL_SWEEP", (128, 640, 2048))  # the real 16384 is slow in bf16 here
    result = run_bench("2b", "bf16", torch.device("cpu"), prompt_tokens=32, gen_tokens=4, compare_hf=True,
                       long_tokens=1200, sweep=True)
    hf = result["hf"]
    assert hf["dtype"] == "bfloat16" and hf["prefill_tok_s"] > 0 and hf["decode_tok_s"] > 0
    ratio = result["decode_tok_s"] / hf["decode_tok_s"]
    assert result["speedup_decode"] == pytest.approx(ratio, rel=1e-2, abs=0.005)  # rounded to 2 decimals
    for records in (result["long"], hf["long"]):
        assert [r["tokens"] for r in records] == [300, 600, 1024, 1200]
        assert all(r["rss_bytes"] > 0 and r["tok_s"] > 0 for r in records)
    assert 0 <= result["long_memory_drift"] < 1 and result["long_speed_drift"] >= 0
    assert [row["tokens"] for row in result["prefill_sweep"]] == [128, 640, 2048]
    png = plot(result, tmp_path / "long.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_drift_is_measured_from_1k_tokens():
    records = [{"tokens": t, "m": m} for t, m in ((500, 50.0), (1024, 100.0), (2048, 101.0), (4096, 97.0))]
    assert drift(records, "m") == 0.03
