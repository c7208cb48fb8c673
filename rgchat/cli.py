"""The command line: parses flags, calls the library, and turns user errors into one line and exit 1."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import sys
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperCommand, TyperGroup, TyperOption
from typer.exceptions import TyperException

from rgchat import __version__
from rgchat import device as device_lib
from rgchat.config import PRESETS
from rgchat.settings import DEFAULTS, HELP, SettingError, Settings
from rgchat.errors import RGChatError, UsageError
from rgchat.quant import DEFAULT_PRECISION, PRECISIONS


class FlagsTakeNoValue:
    """Help writes a flag bare (`--json`), without the `<bool>` typer puts after it: a flag takes no value."""

    def get_params(self, ctx: typer.Context) -> list:
        params = super().get_params(ctx)
        for param in params:
            if isinstance(param, TyperOption) and param.is_flag:
                param.metavar = ""
        return params


class Command(FlagsTakeNoValue, TyperCommand):
    pass


class Group(FlagsTakeNoValue, TyperGroup):
    pass


app = typer.Typer(
    cls=Group,
    help="Chat with RecurrentGemma models on your own machine, in constant memory.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def print_version(wanted: bool) -> None:
    if wanted:
        print(f"rgchat {__version__}")
        raise typer.Exit()


@app.callback()
def app_options(
    version: Annotated[bool, typer.Option("--version", callback=print_version, is_eager=True,
                                          help="Print rgchat's version and exit.")] = False,
) -> None:
    """The options that come before the command: --version (and --help)."""


def user_errors(command: Callable) -> Callable:
    """Turn the errors users can cause into one line on stderr and an exit code, never a traceback. Anything
    else the system raises gets one line too (RGCHAT_DEBUG=1 shows the traceback instead)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except RGChatError as e:
            print(f"rgchat: error: {e}", file=sys.stderr)
            raise typer.Exit(2 if isinstance(e, UsageError) else 1) from None
        except KeyboardInterrupt:
            print("rgchat: interrupted", file=sys.stderr)
            raise typer.Exit(130) from None
        except BrokenPipeError:  # the reader went away (e.g. `| head`): nothing left to say
            raise typer.Exit(0) from None
        except (typer.Exit, typer.Abort, TyperException):  # typer's own exits and usage errors
            raise
        except Exception as e:
            if os.environ.get("RGCHAT_DEBUG"):
                raise
            where = f"{e.filename}: " if isinstance(e, OSError) and e.filename else ""
            what = e.strerror if isinstance(e, OSError) and e.strerror else f"{type(e).__name__}: {e}"
            print(f"rgchat: error: {where}{what}", file=sys.stderr)
            raise typer.Exit(1) from None

    return wrapper


Precision = Enum("Precision", {name: name for name in PRECISIONS}, type=str)
Device = Enum("Device", {name: name for name in device_lib.CHOICES}, type=str)
Shape = Enum("Shape", {name: name for name in PRESETS}, type=str)
Compare = Enum("Compare", {"hf": "hf"}, type=str)
PrecisionOpt = Annotated[Precision, typer.Option(help="Weight precision.")]
DeviceOpt = Annotated[Device, typer.Option(help="Device to run on; auto picks CUDA, then MPS, then CPU.")]
LOAD_PRECISION_HELP = (f"Weights to convert a checkpoint or Hub model to (by default {DEFAULT_PRECISION}); a model "
                       "converted already must hold these.")


@app.command(cls=Command)
@user_errors
def run(
    model: Annotated[str, typer.Argument(help="A Hub alias (2b, 2b-it, 9b, 9b-it) or hf:OWNER/REPO, downloaded "
                                              "once; a model in the store; a model file; or a checkpoint (Hugging "
                                              "Face folder or official .pt), converted into the store once.")],
    prompt: Annotated[Optional[str], typer.Argument(help="Ask this and exit (stdin, when piped, is appended). "
                                                         "Without it, a terminal gets the interactive chat.")] = None,
    raw: Annotated[bool, typer.Option("--raw", help="Continue the text as is, no chat template.")] = False,
    chat: Annotated[bool, typer.Option("--chat", help="Use Gemma's chat template (default for -it models).")] = False,
    system: Annotated[Optional[str], typer.Option(help="Instructions put at the head of the first user turn.")] = None,
    temperature: Annotated[float, typer.Option(help=HELP["temperature"])] = DEFAULTS.temperature,
    top_k: Annotated[int, typer.Option(help=HELP["top_k"])] = DEFAULTS.top_k,
    top_p: Annotated[float, typer.Option(help=HELP["top_p"])] = DEFAULTS.top_p,
    min_p: Annotated[float, typer.Option(help=HELP["min_p"])] = DEFAULTS.min_p,
    repeat_penalty: Annotated[float, typer.Option(help=HELP["repeat_penalty"])] = DEFAULTS.repeat_penalty,
    seed: Annotated[Optional[int], typer.Option(help=HELP["seed"])] = DEFAULTS.seed,
    max_tokens: Annotated[int, typer.Option(help=HELP["max_tokens"])] = DEFAULTS.max_tokens,
    stop: Annotated[Optional[list[str]], typer.Option(help=HELP["stop"])] = None,
    lines: Annotated[bool, typer.Option("--lines", help="Each stdin line is one user turn of one conversation; "
                                                       "each answer ends with a newline.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Print timings and memory on stderr.")] = False,
    stats_json: Annotated[bool, typer.Option("--stats-json", help="Print each answer's stats as a JSON line "
                                                                 "on stderr.")] = False,
    state: Annotated[Optional[Path], typer.Option(help="Resume the conversation saved in this file (start one "
                                                       "if it does not exist) and save it after every turn.")] = None,
    precision: Annotated[Optional[Precision], typer.Option(help=LOAD_PRECISION_HELP)] = None,
    device: DeviceOpt = Device.auto,
) -> None:
    """Chat with a model: interactively in a terminal, or answer PROMPT and/or stdin and exit."""
    from rgchat import chat as chat_lib
    from rgchat import loader, pipe, statefile

    if raw and chat:
        raise UsageError("--raw and --chat exclude each other")
    prompt = pipe.decode_argument(prompt, "PROMPT", sys.stderr)
    system = pipe.decode_argument(system, "--system", sys.stderr)
    stops = tuple(pipe.decode_argument(text, "--stop", sys.stderr) for text in stop or ())
    try:
        settings = Settings(temperature, top_k, top_p, min_p, repeat_penalty, seed, max_tokens, stops)
    except SettingError as e:  # named as the flag that gave it
        raise UsageError(f"--{e.name.replace('_', '-')}{str(e).removeprefix(e.name)}") from None
    if sys.stdout is None:
        raise RGChatError("standard output is closed: nowhere to write the answer (redirect it to a file)")
    stdin = sys.stdin.buffer if sys.stdin is not None else io.BytesIO()  # a closed stdin reads as empty
    stdin_is_terminal = sys.stdin is not None and sys.stdin.isatty()
    interactive = prompt is None and not lines and stdin_is_terminal and sys.stdout.isatty()
    log = lambda line: print(line, file=sys.stderr)  # noqa: E731
    # The state file is locked, and known to be writable, before any model runs.
    conversation = statefile.StateFile(state) if state else None
    try:
        saved = conversation.read() if conversation else None
        loaded = loader.load(model, precision.value if precision else None, device_lib.resolve(device.value),
                             log=log)
        session = chat_lib.ChatSession(loaded.model, loaded.tokenizer, settings, system=system,
                                       template=chat or (loaded.instruction_tuned and not raw))
        if saved is not None:
            statefile.resume(session, saved, loaded.identity(), template=True if chat else False if raw else None,
                             seed=seed, system=system, warn=log)
        if conversation is not None:
            session.on_change = lambda s: conversation.write(s, loaded.identity())
        if interactive:
            from rich.console import Console

            from rgchat.repl import Repl

            Repl(session, loaded, Console(highlight=False), verbose, conversation).run()
        elif lines:
            pipe.answer_lines(session, prompt, stdin, sys.stdout, sys.stderr, verbose, stats_json)
        else:
            text = pipe.read_prompt(prompt, None if stdin_is_terminal and prompt is not None else stdin, sys.stderr)
            pipe.answer(session, text, sys.stdout, sys.stderr, verbose, stats_json)
    finally:
        if conversation is not None:
            conversation.close()


@app.command(cls=Command)
@user_errors
def convert(
    source: Annotated[str, typer.Argument(help="A Hugging Face folder or an official .pt checkpoint.")],
    precision: Annotated[Precision, typer.Option(help="Weight format to store.")] = Precision.int8,
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Model file to write (by default "
                                                   "into the store, as NAME-PRECISION).")] = None,
) -> None:
    """Convert a checkpoint into one rgchat model file (tokenizer.model is copied beside it)."""
    from rgchat.checkpoint import Checkpoint
    from rgchat.checkpoint import convert as convert_checkpoint
    from rgchat.loader import checkpoint_entry

    ckpt = Checkpoint(source)
    target = output or checkpoint_entry(ckpt, precision.value)
    path = convert_checkpoint(ckpt.path, precision.value, target, own_folder=output is None)
    print(f"rgchat: wrote {path} ({path.stat().st_size / 2**30:.2f} GiB)", file=sys.stderr)


@app.command(cls=Command)
@user_errors
def pull(
    model: Annotated[str, typer.Argument(help="An alias (2b, 2b-it, 9b, 9b-it) or hf:OWNER/REPO, "
                                            "optionally with @REVISION.")],
    precision: Annotated[Optional[Precision], typer.Option(
        help=f"Weights to download or convert to (by default {DEFAULT_PRECISION}).")] = None,
    keep_original: Annotated[bool, typer.Option("--keep-original", help="Keep the downloaded checkpoint "
                                                                       "files after conversion.")] = False,
) -> None:
    """Download a model from the Hugging Face Hub (resuming, verified) and convert it into the store."""
    from rgchat import hub

    remote = hub.parse(model)
    if remote is None:
        raise UsageError(f"{model!r} is not a Hub model: use an alias ({', '.join(hub.ALIASES)}) or "
                         f"{hub.HUB_PREFIX}OWNER/REPO")
    wanted = precision.value if precision else DEFAULT_PRECISION
    path = hub.pull(remote, wanted, keep_original, log=lambda line: print(line, file=sys.stderr))
    print(f"rgchat: {path.parent.name} is ready ({path.stat().st_size / 2**30:.2f} GiB)", file=sys.stderr)


@app.command("list", cls=Command)
@user_errors
def list_models(
    available: Annotated[bool, typer.Option("--available", help="List the Hub aliases and their sizes per "
                                                               "precision instead.")] = False,
) -> None:
    """List the models in the store: name, precision, size on disk, source (or what is wrong with it)."""
    from rgchat.store import list_entries, store_dir

    if available:
        from rgchat import hub

        for alias, repo, sizes in hub.available():
            print(f"{alias}\t{repo}\t" + "\t".join(f"{p} {n / 2**30:.2f} GiB" for p, n in sizes.items()))
        return
    entries = list_entries()
    if not entries:
        print(f"rgchat: no models in {store_dir()} yet (`rgchat convert` or `rgchat run` adds them)",
              file=sys.stderr)
    for e in entries:
        print(f"{e.name}\t{e.precision}\t{e.size / 2**30:.2f} GiB\t{f'DAMAGED: {e.damage}' if e.damage else e.source}")


@app.command(cls=Command)
@user_errors
def show(model: Annotated[str, typer.Argument(help="A model in the store, its folder, or a model file.")]) -> None:
    """Show a model's config, precision, sizes and state size."""
    import torch

    from rgchat import modelfile
    from rgchat.quant import dtype_of
    from rgchat.state import State
    from rgchat.store import find

    path = find(model)
    mf = modelfile.open_file(path)
    config, source = mf.config, mf.source
    params = sum(torch.Size(e["shape"]).numel() for e in mf.entries.values())
    lines = [
        ("name", mf.metadata.get("name", "?")),
        ("file", str(path)),
        ("precision", mf.precision),
        ("size on disk", f"{path.stat().st_size:,} bytes"),
        ("stored values", f"{params:,}"),
        ("config", json.dumps(config.to_dict())),
        ("layers", f"{config.num_layers} ({config.block_types.count('recurrent')} recurrent, "
                   f"{config.block_types.count('attention')} attention)"),
        ("state size", f"{State.size_for(config, dtype_of(mf.precision)):,} bytes at any length"),
        ("source", f"{source.get('path', '?')} ({source.get('kind', '?')})"),
        ("tokenizer sha256", mf.metadata.get("tokenizer_sha256", "?")),
        ("written by", f"rgchat {mf.metadata.get('rgchat_version', '?')}, format {mf.metadata['format_version']}"),
    ]
    for label, value in lines:
        print(f"{label}: {value}")


@app.command(cls=Command)
@user_errors
def verify(model: Annotated[str, typer.Argument(help="A model in the store, its folder, or a model file.")]) -> None:
    """Hash every tensor and the tokenizer against the checksums recorded when the model was made (loading
    skips this for a file unchanged since its last check)."""
    from rgchat.loader import verify as verify_model
    from rgchat.store import find

    for label, value in verify_model(find(model)):
        print(f"{label}: {value}")


@app.command(cls=Command)
@user_errors
def rm(model: Annotated[str, typer.Argument(help="A model in the store.")]) -> None:
    """Remove a model from the store."""
    from rgchat.store import remove

    remove(model)
    print(f"rgchat: removed {model}", file=sys.stderr)


state_app = typer.Typer(cls=Group, help="Inspect saved conversations (state files) and move them to another "
                        "model.", no_args_is_help=True)
app.add_typer(state_app, name="state")


@state_app.command("show", cls=Command)
@user_errors
def state_show(file: Annotated[Path, typer.Argument(help="A state file written by --state or /save.")]) -> None:
    """Print a state file's model, position, settings and transcript."""
    from rgchat import statefile

    saved = statefile.load(file)
    for label, value in statefile.describe(saved):
        print(f"{label}: {value}")
    for turn in saved.transcript:
        print(f"\n[{turn.role}]\n{turn.text}")


@state_app.command("replay", cls=Command)
@user_errors
def state_replay(
    file: Annotated[Path, typer.Argument(help="A state file written by --state or /save.")],
    model: Annotated[str, typer.Option(help="The model to continue the conversation with (as `run` takes it).")],
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Where to write the rebuilt state "
                                                   "(by default it replaces FILE).")] = None,
    precision: Annotated[Optional[Precision], typer.Option(help=LOAD_PRECISION_HELP)] = None,
    device: DeviceOpt = Device.auto,
) -> None:
    """Rebuild a conversation's state for another model or precision by prefilling its transcript."""
    from rgchat import chat as chat_lib
    from rgchat import loader, statefile

    saved = statefile.load(file)
    with contextlib.closing(statefile.StateFile(output or file)) as out:  # locked and writable before the model runs
        loaded = loader.load(model, precision.value if precision else None, device_lib.resolve(device.value),
                             log=lambda line: print(line, file=sys.stderr))
        session = chat_lib.ChatSession(loaded.model, loaded.tokenizer, template=saved.template)
        statefile.replay(saved, session,
                         same_tokenizer=saved.identity.get("tokenizer_sha256") == loaded.tokenizer_sha256)
        out.write(session, loaded.identity())
    print(f"rgchat: replayed {len(saved.transcript)} turns ({session.state.pos} tokens) with {loaded.name} "
          f"into {out.path}", file=sys.stderr)


@app.command(cls=Command)
@user_errors
def bench(
    shape: Annotated[Shape, typer.Option(help="Model shape.")] = Shape["2b"],
    precision: PrecisionOpt = Precision.bf16,
    device: Annotated[Device, typer.Option(show_default=False, help="Device to run on (by default cpu; auto picks "
                                                                  "CUDA, then MPS, then CPU).")] = Device.cpu,
    prompt_tokens: Annotated[int, typer.Option(min=1, help="Prompt length for the prefill timing.")] = 256,
    gen_tokens: Annotated[int, typer.Option(min=0, help="Tokens to decode for the decode timing.")] = 16,
    batch: Annotated[Optional[list[int]], typer.Option(min=1, max=64, help="Conversations (distinct prompts) "
                     "decoded together, one batched step per token; repeat it to measure several, one after "
                     "another (by default 1). With --kernels: rows per product (by default 1 and 8).")] = None,
    seed: Annotated[int, typer.Option(help="Seed for the random weights and prompt.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines instead of a table.")] = False,
    scan: Annotated[bool, typer.Option("--scan", help="Time the RG-LRU scan alone: native vs PyTorch, "
                                                     "T = 1, 2048, 32768 at the 2B width.")] = False,
    kernels: Annotated[bool, typer.Option("--kernels", help="Time the native CPU products alone: GB/s at the "
                                                           "2B matrix shapes against a plain read and torch.")] = False,
    model: Annotated[Optional[Path], typer.Option(help="Bench this model file instead of random weights "
                                                       "(also times loading and start-up).")] = None,
    save: Annotated[Optional[Path], typer.Option(help="Write the random weights as a model file and stop "
                                                      "(to bench loading with --model).")] = None,
    state_file: Annotated[bool, typer.Option("--state-file", help="Time saving and loading a full-window "
                                                                 "conversation state file instead.")] = False,
    compare: Annotated[Optional[Compare], typer.Option(help="Also run transformers' RecurrentGemma on the same "
                                                           "weights and prompt (bf16, or f32 with --precision f32).")] = None,
    long: Annotated[int, typer.Option(min=0, help="Also generate this many tokens, recording memory and speed "
                                                  "at 1k, N/4, N/2 and N.")] = 0,
    prefill_sweep: Annotated[bool, typer.Option("--prefill-sweep", help="Also time prefill at 128, 2048 and "
                                                                       "16384 tokens.")] = False,
    plot: Annotated[Optional[Path], typer.Option(help="Draw memory and speed against tokens (with --long), or "
                                                      "speed against --batch (several given), into this PNG "
                                                      "(needs matplotlib).")] = None,
    server: Annotated[Optional[str], typer.Option(help="Instead, load a running `rgchat serve` at this URL: "
                                                       "the 10th turn of a 4,000-token conversation from its "
                                                       "snapshot and cold, then --clients streams at once.")] = None,
    clients: Annotated[Optional[list[int]], typer.Option(min=1, max=256, help="Concurrent streaming clients "
                                                         "for --server (repeatable; by default 1, 4 and 8).")] = None,
    api_key: Annotated[Optional[str], typer.Option(envvar="RGCHAT_API_KEY", help="The server's key.")] = None,
) -> None:
    """Measure prefill and decode speed on random weights of a real shape (no download needed)."""
    from rgchat.bench import run_bench, time_scan, time_state_file
    from rgchat.bench.plot import plot as bench_plot
    from rgchat.bench.plot import plot_batches
    from rgchat.bench.random_weights import save_random_model

    if server:
        from rgchat.bench import server_load

        client = server_load.Client(server, api_key)
        server_load.concurrent(client, max(clients or [8]), max_tokens=2)  # warm-up: every slot used once
        print(json.dumps(server_load.resumed_turn(client)), flush=True)
        for n in clients or [1, 4, 8]:
            print(json.dumps(server_load.concurrent(client, n)), flush=True)
        return
    dev = device_lib.resolve(device.value)
    if save:
        path = save_random_model(shape.value, precision.value, save, seed)
        print(f"rgchat: wrote {path} ({path.stat().st_size / 2**30:.2f} GiB)", file=sys.stderr)
        return
    if kernels:
        from rgchat.bench.kernels import kernel_table

        results = kernel_table(rows=tuple(batch or (1, 8)), seed=seed)
    elif scan:
        results = time_scan(dev, precision.value, seed=seed)
    elif state_file:
        import tempfile

        with tempfile.TemporaryDirectory() as folder:
            results = [time_state_file(shape.value, precision.value, Path(folder))]
    else:
        batches = batch or [1]
        if plot and not long and len(batches) < 2:
            raise UsageError("--plot draws the --long run, or several --batch runs: give --long N or --batch "
                             "more than once")
        results = [run_bench(shape.value, precision.value, dev, prompt_tokens, gen_tokens, seed, model,
                             compare_hf=compare is not None, long_tokens=long, sweep=prefill_sweep, batch=b)
                   for b in batches]
        if plot:
            drawn = plot_batches(results, plot) if len(batches) > 1 else bench_plot(results[0], plot)
            print(f"rgchat: wrote {drawn}", file=sys.stderr)
    if as_json:
        for result in results:
            print(json.dumps(result))
        return
    from rich.console import Console
    from rich.table import Table

    title = " --kernels: native CPU products" if kernels else f"{' --scan' if scan else ''}: {precision.value} on {dev}"
    table = Table(title=f"rgchat bench{title}")
    scalars = [k for k, v in results[0].items() if not isinstance(v, (dict, list))]
    for key in scalars:
        table.add_column(key, justify="right")
    for result in results:
        table.add_row(*(f"{result[k]:,}" if isinstance(result[k], (int, float)) else str(result[k]) for k in scalars))
    Console().print(table)
    for result in results:  # nested figures (transformers, long run, prefill sweep) as JSON
        for key, value in result.items():
            if isinstance(value, (dict, list)):
                print(f"{key}: {json.dumps(value)}")


SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str, flag: str) -> int:
    """Bytes from 2GiB, 512M, 10G, 0 or a plain number (units are powers of 1024)."""
    import re

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text.lower())
    if not m:
        raise UsageError(f"{flag}: {text!r} is not a size (say 512MiB, 2GiB, 0)")
    return int(float(m.group(1)) * SIZE_UNITS[m.group(2)])


DEFAULT_PARALLEL = {"cpu": 4, "cuda": 8, "mps": 2}


@app.command(cls=Command)
@user_errors
def serve(
    model: Annotated[str, typer.Argument(help="The model, named as for `rgchat run`.")],
    host: Annotated[str, typer.Option(help="Address to listen on (beyond 127.0.0.1, set --api-key).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port (0 picks a free one).")] = 8080,
    api_key: Annotated[Optional[str], typer.Option(envvar="RGCHAT_API_KEY", show_envvar=True,
                                                   help="Require Authorization: Bearer KEY.")] = None,
    parallel: Annotated[Optional[int], typer.Option(min=1, max=64, help="Conversations decoded together "
                                                                        "(by default 4 on CPU, 8 on CUDA, 2 on MPS).")] = None,
    queue: Annotated[int, typer.Option(min=1, max=100_000, help="Requests that may wait for a slot; "
                                                                "more get 429.")] = 64,
    max_prompt_tokens: Annotated[int, typer.Option(min=1, help="Most new prompt tokens one request may "
                                                               "make the server read.")] = 32768,
    cache_dir: Annotated[Optional[Path], typer.Option(help="Folder for the conversation snapshots (by "
                                                           "default .server-cache in the store).")] = None,
    cache_memory: Annotated[str, typer.Option(help="Snapshots kept in memory.")] = "2GiB",
    cache_disk: Annotated[str, typer.Option(help="Snapshots kept on disk (0: none).")] = "10GiB",
    precision: Annotated[Optional[Precision], typer.Option(help=LOAD_PRECISION_HELP)] = None,
    device: DeviceOpt = Device.auto,
) -> None:
    """Serve MODEL over OpenAI's API; every conversation's snapshot is kept, so a follow-up reads only its
    new messages."""
    import dataclasses

    from rgchat import loader, server, serving
    from rgchat.snapshots import SnapshotCache
    from rgchat.store import store_dir

    memory, disk = parse_size(cache_memory, "--cache-memory"), parse_size(cache_disk, "--cache-disk")
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    dev = device_lib.resolve(device.value)
    if api_key is not None and not api_key:
        raise UsageError("--api-key is empty")
    path = loader.resolve(model, precision.value if precision else DEFAULT_PRECISION, log=log)  # downloads, converts
    folder = cache_dir if cache_dir is not None else store_dir() / ".server-cache"

    def load():
        loaded = loader.load(str(path), precision.value if precision else None, dev, log=log)
        return dataclasses.replace(loaded, spec=model)

    def make_cache(loaded):
        return SnapshotCache(loaded.identity(), loaded.model.config, memory, folder, disk, log)

    worker = serving.Worker(load, parallel or DEFAULT_PARALLEL.get(dev.type, 1), queue, make_cache, log)
    server.serve(worker, host, port, api_key, max_prompt_tokens, log)


@app.command(cls=Command)
@user_errors
def doctor() -> None:
    """Print versions, devices, the active scan backend per device, and where models and caches live."""
    from rgchat.doctor import report

    for label, value in report():
        print(f"{label}: {value}")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:  # before or after a command runs (inside one, `user_errors` answers it)
        sys.exit(130)
    finally:
        _release_stdout()


def _release_stdout() -> None:
    """Flush stdout now. If it cannot take what is left (full, closed, its reader gone), point it at
    /dev/null, so that the interpreter's own flush at exit has nothing to complain about."""
    if sys.stdout is None:
        return
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)


if __name__ == "__main__":
    main()
