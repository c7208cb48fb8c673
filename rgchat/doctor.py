"""`rgchat doctor`: the facts a bug report needs, as (label, value) lines."""

from __future__ import annotations

import os
import platform
import sys

import torch

import rgchat
from rgchat import cuda_graph, gemv, scan, step_ops
from rgchat.errors import RGChatError


def devices() -> list[str]:
    found = ["cpu"]
    if torch.cuda.is_available():
        found.append("cuda")
    if torch.backends.mps.is_available():
        found.append("mps")
    return found


def report() -> list[tuple[str, str]]:
    from huggingface_hub import constants as hub

    from rgchat.store import store_dir

    lines = [
        ("rgchat", rgchat.__version__),
        ("python", f"{platform.python_version()} ({sys.executable})"),
        ("torch", f"{torch.__version__}, {torch.get_num_threads()} threads"),
        ("platform", platform.platform()),
    ]
    if torch.cuda.is_available():
        lines.append(("cuda", f"{torch.version.cuda}, {torch.cuda.get_device_name(0)}"))
    choice = os.environ.get(scan.ENV_VAR, "auto")
    for device in devices():
        try:
            backend = scan.backend_for(device, choice)
            lines.append((f"scan ({device})", f"{backend.name} ({backend.detail})"))
        except RGChatError as e:
            lines.append((f"scan ({device})", f"error: {e}"))
    for name, load, env_var in (("matrix products (cpu)", gemv.cpu_kernels, gemv.ENV_VAR),
                                ("decode step (cpu)", step_ops.step_ops, step_ops.ENV_VAR)):
        try:
            native = load()
        except RGChatError as e:
            lines.append((name, f"error: {e}"))
            continue
        if native is not None:
            lines.append((name, f"native ({native.detail()})"))
        elif os.environ.get(env_var) == "torch":
            lines.append((name, f"torch ({env_var}=torch)"))
        else:
            lines.append((name, "torch (native library not loaded)"))
    try:
        lines.append(("model store", str(store_dir())))
    except RGChatError as e:
        lines.append(("model store", f"error: {e}"))
    lines.append(("hugging face cache", str(hub.HF_HUB_CACHE)))
    cache = cuda_graph.describe_compile_cache(cuda_graph.compile_cache_dir()) if torch.cuda.is_available() else None
    lines.append(("compile cache (cuda)", cache or "not used without CUDA"))
    return lines
