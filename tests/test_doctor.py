import shutil

import pytest
import torch
from typer.testing import CliRunner

from rgchat import cuda_graph
from rgchat.cli import app
from rgchat.scan import backend_for


def test_doctor_reports_versions_scan_backend_and_paths(monkeypatch, tmp_path):
    monkeypatch.setenv("RGCHAT_HOME", str(tmp_path / "store"))
    out = CliRunner().invoke(app, ["doctor"])
    assert out.exit_code == 0, out.output
    lines = dict(line.split(": ", 1) for line in out.stdout.splitlines())
    assert {"rgchat", "python", "torch", "scan (cpu)", "model store", "hugging face cache"} <= set(lines)
    expected = backend_for("cpu", "auto")
    assert lines["scan (cpu)"] == f"{expected.name} ({expected.detail})"
    assert lines["model store"] == str(tmp_path / "store")
    cache = cuda_graph.describe_compile_cache(cuda_graph.compile_cache_dir())
    assert lines["compile cache (cuda)"] == (cache if torch.cuda.is_available() else "not used without CUDA")


def test_doctor_shows_a_forced_torch_scan(monkeypatch):
    monkeypatch.setenv("RGCHAT_SCAN", "torch")
    out = CliRunner().invoke(app, ["doctor"])
    assert "scan (cpu): torch (PyTorch loop)" in out.stdout


def test_doctor_names_forced_torch_products_and_step(monkeypatch):
    monkeypatch.setenv("RGCHAT_GEMV", "torch")
    monkeypatch.setenv("RGCHAT_STEP", "torch")
    out = CliRunner().invoke(app, ["doctor"])
    assert "matrix products (cpu): torch (RGCHAT_GEMV=torch)" in out.stdout
    assert "decode step (cpu): torch (RGCHAT_STEP=torch)" in out.stdout


@pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")), reason="no C compiler: the scan falls back")
def test_native_cpu_scan_is_built_by_the_install():
    """Where a C compiler exists, the README's install command compiles kernels/rglru_scan.c."""
    assert backend_for("cpu", "auto").name == "native"
