"""The command line: parses flags, calls the library, and turns user errors into one line and exit 1."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from rgchat import device as device_lib
from rgchat.config import PRESETS
from rgchat.errors import RGChatError
from rgchat.quant import PRECISIONS

app = typer.Typer(
    help="Chat with RecurrentGemma models on your own machine, in constant memory.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

def user_errors(command: Callable) -> Callable:
    """Turn the errors users can cause into one line on stderr and an exit code, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except RGChatError as e:
            print(f"rgchat: error: {e}", file=sys.stderr)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            print("rgchat: interrupted", file=sys.stderr)
            raise typer.Exit(130) from None
        except BrokenPipeError:  # the reader went away (e.g. `| head`): nothing left to say
            sys.stderr.close()
            raise typer.Exit(0) from None

    return wrapper


Precision = Enum("Precision", {name: name for name in PRECISIONS}, type=str)
Device = Enum("Device", {name: name for name in device_lib.CHOICES}, type=str)
Shape = Enum("Shape", {name: name for name in PRESETS}, type=str)
PrecisionOpt = Annotated[Precision, typer.Option(help="Weight precision.")]
DeviceOpt = Annotated[Device, typer.Option(help="auto picks CUDA, then MPS, then CPU.")]


@app.command()
@user_errors
def run(
    model: Annotated[str, typer.Argument(help="A model in the store, a model file, or a checkpoint (Hugging Face "
                                              "folder or official .pt), converted into the store once.")],
    prompt: Annotated[Optional[str], typer.Argument(help="Text to continue (raw) or to ask (chat).")] = None,
    raw: Annotated[bool, typer.Option("--raw", help="Continue the text as is, no chat template.")] = False,
    chat: Annotated[bool, typer.Option("--chat", help="Wrap the prompt in Gemma's chat template.")] = False,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 is greedy.")] = 0.0,
    top_k: Annotated[int, typer.Option(min=0, help="Sample from the k likeliest tokens (0: all).")] = 0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0, help="Nucleus sampling mass.")] = 1.0,
    seed: Annotated[Optional[int], typer.Option(help="Seed for reproducible sampling.")] = None,
    max_tokens: Annotated[int, typer.Option(min=1, help="Most tokens to generate.")] = 256,
    precision: Annotated[Optional[Precision], typer.Option(
        help="Weights to convert a checkpoint to [default: int8 on CPU and MPS, bf16 on CUDA].")] = None,
    device: DeviceOpt = Device.auto,
) -> None:
    """Generate a continuation (or one chat answer) and stream it to stdout."""
    from rgchat.checkpoint import TOKENIZER_FILE, load_file
    from rgchat.generate import generate
    from rgchat.sampling import Sampler
    from rgchat.store import resolve
    from rgchat.tokenizer import StreamingDetokenizer, Tokenizer

    if raw and chat:
        raise typer.BadParameter("--raw and --chat exclude each other")
    dev = device_lib.resolve(device.value)
    wanted = precision.value if precision else ("bf16" if dev.type == "cuda" else "int8")
    path = resolve(model, wanted, log=lambda line: print(line, file=sys.stderr))
    engine, mf = load_file(path, str(dev))
    if precision and mf.precision != precision.value:
        raise RGChatError(f"{path} holds {mf.precision} weights, not {precision.value}: "
                          f"convert the original checkpoint with --precision {precision.value}")
    tokenizer_path = path.parent / TOKENIZER_FILE
    tokenizer = Tokenizer(tokenizer_path)
    if tokenizer.vocab_size > engine.config.vocab_size:
        raise RGChatError(f"{tokenizer_path}: tokenizer has {tokenizer.vocab_size} pieces but "
                          f"the model only {engine.config.vocab_size}: wrong tokenizer for this model")
    use_chat = chat or (not raw and mf.metadata.get("name", "").endswith("-it"))
    if prompt is None and not sys.stdin.isatty():  # `echo question | rgchat run MODEL`
        prompt = sys.stdin.buffer.read().decode("utf-8", errors="replace")
    prompt = prompt or ""
    ids = [tokenizer.bos_id] + (tokenizer.chat_prompt(prompt) if use_chat else tokenizer.encode(prompt))
    stop_ids = {tokenizer.eos_id} | ({tokenizer.end_of_turn_id} if use_chat else set())
    sampler = Sampler(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    vocab = tokenizer.vocab_size  # a model's embedding may have rows past the tokenizer's pieces: never pick those
    detok = StreamingDetokenizer(tokenizer)
    for token in generate(engine, engine.new_state(), ids, max_tokens, lambda l: sampler(l[:vocab]), stop_ids):
        if token in stop_ids:
            break
        sys.stdout.write(detok.add(token))
        sys.stdout.flush()
    sys.stdout.write(detok.flush() + "\n")
    sys.stdout.flush()


@app.command()
@user_errors
def convert(
    source: Annotated[str, typer.Argument(help="A Hugging Face folder or an official .pt checkpoint.")],
    precision: Annotated[Precision, typer.Option(help="Weight format to store.")] = Precision.int8,
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Model file to write "
                                                   "[default: into the store, as NAME-PRECISION].")] = None,
) -> None:
    """Convert a checkpoint into one rgchat model file (tokenizer.model is copied beside it)."""
    from rgchat.checkpoint import convert as convert_checkpoint
    from rgchat.store import entry_name, entry_path

    src = Path(source).expanduser()
    path = convert_checkpoint(src, precision.value, output or entry_path(entry_name(src, precision.value)))
    print(f"rgchat: wrote {path} ({path.stat().st_size / 2**30:.2f} GiB)", file=sys.stderr)


@app.command("list")
@user_errors
def list_models() -> None:
    """List the models in the store: name, precision, size on disk, source."""
    from rgchat.store import list_entries, store_dir

    entries = list_entries()
    if not entries:
        print(f"rgchat: no models in {store_dir()} yet (`rgchat convert` or `rgchat run` adds them)",
              file=sys.stderr)
    for e in entries:
        print(f"{e.name}\t{e.precision}\t{e.size / 2**30:.2f} GiB\t{e.source}")


@app.command()
@user_errors
def show(model: Annotated[str, typer.Argument(help="A model in the store, or a model file.")]) -> None:
    """Show a model's config, precision, sizes and state size."""
    from rgchat.store import show_lines

    for label, value in show_lines(model):
        print(f"{label}: {value}")


@app.command()
@user_errors
def rm(model: Annotated[str, typer.Argument(help="A model in the store.")]) -> None:
    """Remove a model from the store."""
    from rgchat.store import remove

    remove(model)
    print(f"rgchat: removed {model}", file=sys.stderr)


@app.command()
@user_errors
def bench(
    shape: Annotated[Shape, typer.Option(help="Model shape.")] = Shape["2b"],
    precision: PrecisionOpt = Precision.bf16,
    device: DeviceOpt = Device.cpu,
    prompt_tokens: Annotated[int, typer.Option(min=1, help="Prompt length for the prefill timing.")] = 256,
    gen_tokens: Annotated[int, typer.Option(min=0, help="Tokens to decode for the decode timing.")] = 16,
    seed: Annotated[int, typer.Option(help="Seed for the random weights and prompt.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines instead of a table.")] = False,
    scan: Annotated[bool, typer.Option("--scan", help="Time the RG-LRU scan alone: native vs PyTorch, "
                                                     "T = 1, 2048, 32768 at the 2B width.")] = False,
    model: Annotated[Optional[Path], typer.Option(help="Bench this model file instead of random weights "
                                                       "(also times loading and start-up).")] = None,
    save: Annotated[Optional[Path], typer.Option(help="Write the random weights as a model file and stop "
                                                      "(to bench loading with --model).")] = None,
) -> None:
    """Measure prefill and decode speed on random weights of a real shape (no download needed)."""
    from rgchat.bench import run_bench, save_random_model, time_scan

    dev = device_lib.resolve(device.value)
    if save:
        path = save_random_model(shape.value, precision.value, save, seed)
        print(f"rgchat: wrote {path} ({path.stat().st_size / 2**30:.2f} GiB)", file=sys.stderr)
        return
    if scan:
        results = time_scan(dev, precision.value, seed=seed)
    else:
        results = [run_bench(shape.value, precision.value, dev, prompt_tokens, gen_tokens, seed, model)]
    if as_json:
        for result in results:
            print(json.dumps(result))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"rgchat bench{' --scan' if scan else ''}: {precision.value} on {dev}")
    for key in results[0]:
        table.add_column(key, justify="right")
    for result in results:
        table.add_row(*(f"{v:,}" if isinstance(v, (int, float)) else str(v) for v in result.values()))
    Console().print(table)


@app.command()
@user_errors
def doctor() -> None:
    """Print versions, devices, the active scan backend per device, and where models and caches live."""
    from rgchat.doctor import report

    for label, value in report():
        print(f"{label}: {value}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
