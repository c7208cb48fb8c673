"""`rgchat bench --plot`: memory and decode speed against tokens generated (`--long`), or decode speed
against the number of conversations decoded together (several `--batch`), as a PNG."""

from __future__ import annotations

import io
from pathlib import Path

from rgchat.errors import RGChatError
from rgchat.files import write_atomically


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RGChatError("--plot needs matplotlib: pip install matplotlib (or rgchat[plot])") from None
    return plt


def _save(fig, path: Path) -> Path:
    plt = _pyplot()
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=110)
    plt.close(fig)
    write_atomically(path, image.getvalue())
    return path


def plot(result: dict, path: Path) -> Path:
    """Memory and decode speed against tokens generated, rgchat and (when compared) transformers."""
    plt = _pyplot()
    series = {"rgchat": result.get("long", [])}
    if "hf" in result and "long" in result["hf"]:
        series["transformers"] = result["hf"]["long"]
    key = "device_bytes" if result["device"].startswith("cuda") else "rss_bytes"
    fig, (mem, speed) = plt.subplots(1, 2, figsize=(11, 4))
    for label, records in series.items():
        tokens = [r["tokens"] for r in records]
        mem.plot(tokens, [r[key] / 2**30 for r in records], marker="o", label=label)
        speed.plot(tokens, [r["tok_s"] for r in records], marker="o", label=label)
    mem.set(xlabel="tokens generated", ylabel=f"{'GPU' if key == 'device_bytes' else 'resident'} memory (GiB)",
            title="memory", ylim=(0, None))
    speed.set(xlabel="tokens generated", ylabel="decode tok/s", title="decode speed", ylim=(0, None))
    for ax in (mem, speed):
        ax.legend()
    fig.suptitle(f"{result['shape']} {result['precision']} on {result['device']}")
    return _save(fig, path)


def plot_batches(results: list[dict], path: Path) -> Path:
    """Decode tok/s of all conversations together and of each, against how many are decoded together; one
    line per device and precision."""
    plt = _pyplot()
    fig, (together, each) = plt.subplots(1, 2, figsize=(11, 4))
    groups: dict[str, list[dict]] = {}
    for r in results:
        groups.setdefault(f"{r['shape']} {r['precision']} on {r['device']}", []).append(r)
    for label, rows in groups.items():
        rows = sorted(rows, key=lambda r: r["batch"])
        batches = [r["batch"] for r in rows]
        together.plot(batches, [r["decode_tok_s"] for r in rows], marker="o", label=label)
        each.plot(batches, [r["per_conversation_decode_tok_s"] for r in rows], marker="o", label=label)
    for ax, title in ((together, "all conversations"), (each, "each conversation")):
        ax.set(xlabel="conversations decoded together", ylabel="decode tok/s", title=title, ylim=(0, None))
        ax.set_xscale("log", base=2)
        ax.legend()
    return _save(fig, path)
