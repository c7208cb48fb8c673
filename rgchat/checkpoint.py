"""Reading RecurrentGemma checkpoints: a Hugging Face folder (safetensors) or the official PyTorch `.pt`.

Both are read tensor by tensor and converted into one rgchat model file as they arrive, so conversion
never needs much more memory than its output; the model file is then loaded by mmap. Names are mapped to
transformers' names (without `model.`).
"""

from __future__ import annotations

import json
import pickle
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from rgchat import __version__, modelfile
from rgchat import config as config_lib
from rgchat.config import GriffinConfig
from rgchat.errors import RGChatError
from rgchat.files import copy_atomically, open_regular, read_bounded, writable_target
from rgchat.model import Griffin
from rgchat.progress import Reporter
from rgchat.quant import check_precision, convert_tensor, dtype_of, quantizable_weights, swap_modules_
from rgchat.store import TOKENIZER_FILE, source_name

MAX_JSON_BYTES = 16 << 20  # config.json and the shard index are a few KB; refuse anything near this


def _official_to_hf(name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """Map one tensor of the official state dict to the transformers name(s) and layout."""
    if name == "embedder.input_embedding":
        yield "embed_tokens.weight", tensor
        return
    if name == "final_norm.scale":
        yield "final_norm.weight", tensor
        return
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
    if not m:
        raise RGChatError(f"unexpected tensor {name!r} in the official checkpoint")
    layer, rest = f"layers.{m.group(1)}", m.group(2)
    if rest == "mlp_block.ffw_up.w":  # [2, D, M]: gate and up, stored input-major
        yield f"{layer}.mlp_block.gate_proj.weight", tensor[0].T
        yield f"{layer}.mlp_block.up_proj.weight", tensor[1].T
    elif rest == "mlp_block.ffw_up.b":  # [2, 1, 1, M]
        yield f"{layer}.mlp_block.gate_proj.bias", tensor[0].reshape(-1)
        yield f"{layer}.mlp_block.up_proj.bias", tensor[1].reshape(-1)
    elif rest == "recurrent_block.conv_1d.w":  # [width, L] -> [L, 1, width]
        yield f"{layer}.temporal_block.conv_1d.weight", tensor.T[:, None, :]
    else:
        renames = [
            (r"(temporal_pre_norm|channel_pre_norm)\.scale", r"\1.weight"),
            (r"mlp_block\.ffw_down\.", "mlp_block.down_proj."),
            (r"recurrent_block\.conv_1d\.b", "temporal_block.conv_1d.bias"),
            (r"recurrent_block\.rg_lru\.a_param", "temporal_block.rg_lru.recurrent_param"),
            (r"recurrent_block\.rg_lru\.input_gate\.(w|b)", r"temporal_block.rg_lru.input_gate_\1"),
            (r"recurrent_block\.rg_lru\.a_gate\.(w|b)", r"temporal_block.rg_lru.recurrent_gate_\1"),
            (r"recurrent_block\.", "temporal_block."),
            (r"attention_block\.proj_final\.", "temporal_block.o_proj."),
            (r"attention_block\.proj_([qkv])\.", r"temporal_block.\1_proj."),
        ]
        for pattern, replacement in renames:
            new, n = re.subn(f"^{pattern}", replacement, rest)
            if n:
                new = re.sub(r"_gate_w$", "_gate_weight", re.sub(r"_gate_b$", "_gate_bias", new))
                yield f"{layer}.{new}", tensor
                return
        raise RGChatError(f"unexpected tensor {name!r} in the official checkpoint")


def _hf_name(name: str) -> str | None:
    """transformers name -> ours; None for tensors we do not need (the lm_head copy of the embedding)."""
    if name.startswith("lm_head."):
        return None
    return name.removeprefix("model.")


def _read_pt(path: Path) -> dict[str, torch.Tensor]:
    open_regular(path).close()  # torch.load would read a device or FIFO without end
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unsupported content"
        raise RGChatError(f"{path}: refused to load a .pt holding more than tensors ({first})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise RGChatError(f"{path}: not a readable PyTorch checkpoint ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise RGChatError(f"{path}: expected a flat state dict of tensors")
    return data


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(read_bounded(index, MAX_JSON_BYTES, "a safetensors index"))["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise TypeError("weight_map is not an object of file names")
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise RGChatError(f"{index}: not a valid safetensors index ({e})") from None
        files = [folder / f for f in sorted(set(weight_map.values()))]
        if any(Path(f).name != f for f in weight_map.values()):
            raise RGChatError(f"{index}: names files outside its folder")
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise RGChatError(f"{folder}: no .safetensors weights found")
    for f in files:
        if not f.exists():
            raise RGChatError(f"{f}: missing (listed in the safetensors index)")
        open_regular(f).close()
    return files


class Checkpoint:
    """A checkpoint on disk: its config, its tensors (as a stream), and its tokenizer path."""

    def __init__(self, path: str | Path):
        path = Path(path).expanduser()
        if not path.exists():
            raise RGChatError(f"{path}: no such file or directory")
        self.path = path
        if path.is_file() and path.suffix == ".pt":
            self.kind, folder = "official", path.parent
            self.pt_file: Path | None = path
        elif path.is_dir() and (path / "config.json").exists():
            self.kind, folder = "hf", path
            self.pt_file = None
        elif path.is_dir() and len(pts := sorted(path.glob("*.pt"))) == 1:
            self.kind, folder = "official", path
            self.pt_file = pts[0]
        else:
            raise RGChatError(f"{path}: not a RecurrentGemma checkpoint (want a folder with config.json and "
                              "safetensors, or an official .pt file)")
        self.tokenizer_path = folder / TOKENIZER_FILE
        self.config = self._read_config()

    def _read_config(self) -> GriffinConfig:
        if self.kind == "hf":
            try:
                data = json.loads(read_bounded(self.path / "config.json", MAX_JSON_BYTES, "a config.json"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise RGChatError(f"{self.path / 'config.json'}: not valid JSON ({e})") from None
            if not isinstance(data, dict):
                raise RGChatError(f"{self.path / 'config.json'}: not a JSON object")
            return config_lib.from_hf_config(data)
        shapes = {name: tuple(t.shape) for name, t in self.tensors()}
        return config_lib.from_hf_shapes(shapes)

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor) in our naming, one at a time."""
        if self.pt_file is not None:
            for name, tensor in _read_pt(self.pt_file).items():
                yield from _official_to_hf(name, tensor)
            return
        for file in _safetensors_files(self.path):
            try:
                with safe_open(file, framework="pt") as f:
                    for key in f.keys():
                        if (name := _hf_name(key)) is not None:
                            yield name, f.get_tensor(key)
            except (SafetensorError, OSError) as e:
                raise RGChatError(f"{file}: unreadable safetensors file ({e})") from None


# --- converted model files ------------------------------------------------------------------------------

def source_info(ckpt: Checkpoint) -> dict:
    """What a converted file records about where its weights came from (checksums of every source file)."""
    if ckpt.kind == "official":
        files = [ckpt.pt_file, ckpt.tokenizer_path]
    else:
        files = sorted(f for f in ckpt.path.iterdir()
                       if f.suffix in (".json", ".safetensors") or f.name == TOKENIZER_FILE)
    return {
        "path": str(ckpt.path.resolve()),
        "kind": ckpt.kind,
        "files": {f.name: {"size": f.stat().st_size, "mtime_ns": f.stat().st_mtime_ns,
                           "sha256": modelfile.sha256_file(f)} for f in files},
    }


def convert(source: str | Path, precision: str, output: str | Path, *, name: str | None = None,
            origin: dict | None = None, progress: Reporter | None = None, own_folder: bool = False) -> Path:
    """Convert a checkpoint into one model file of `precision`, streaming tensor by tensor.

    The tokenizer is copied beside the output as tokenizer.model; another tokenizer already there is
    refused unless the folder is the output's own (`own_folder`: a store entry). `name` overrides the
    model's name (its folder's), `origin` adds to the recorded source (the Hub repo and revision).
    """
    ckpt = Checkpoint(source)
    output = Path(output)
    check_precision(precision)
    if not ckpt.tokenizer_path.is_file():
        raise RGChatError(f"{ckpt.tokenizer_path}: tokenizer.model not found beside the checkpoint")
    with torch.device("meta"):
        model = Griffin(ckpt.config, dtype_of(precision))
    quantizable = quantizable_weights(model)
    layout = {n: (t.dtype, tuple(t.shape)) for n, t in swap_modules_(model, precision).state_dict().items()}
    tokenizer_copy = output.parent / TOKENIZER_FILE
    tokenizer_sha = modelfile.sha256_file(ckpt.tokenizer_path)
    stale_tokenizer = tokenizer_copy.exists() and modelfile.sha256_file(tokenizer_copy) != tokenizer_sha
    if stale_tokenizer and not own_folder:
        raise RGChatError(f"{tokenizer_copy} exists and is another tokenizer: choose another output folder")
    metadata = {
        "name": name or source_name(ckpt.path),
        "config": json.dumps(ckpt.config.to_dict()),
        "precision": precision,
        "source": json.dumps({**source_info(ckpt), **(origin or {})}),
        "tokenizer_sha256": tokenizer_sha,
        "rgchat_version": __version__,
    }

    total = sum(torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size() for dtype, shape in layout.values())
    task = progress.task(f"converting to {precision}", total) if progress else None

    def converted():
        for tensor_name, tensor in ckpt.tensors():
            stored = convert_tensor(tensor_name, tensor, precision, quantizable)
            unknown = set(stored) - set(layout)
            if unknown:
                raise RGChatError(f"{ckpt.path}: unexpected tensor {min(unknown)!r} for this configuration")
            yield from stored.items()
            if task:
                task.advance(sum(t.numel() * t.element_size() for t in stored.values()))
        if task:
            task.done()

    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RGChatError(f"{output.parent}: cannot create the folder ({e.strerror or e})") from None
    writable_target(output)  # refused before anything is written beside it
    # The tokenizer first: the model file, which records the tokenizer's checksum, is what makes the pair
    # valid, so a crash in between leaves a pair that `chat.load` refuses and the store converts again.
    if stale_tokenizer or not tokenizer_copy.exists():
        copy_atomically(ckpt.tokenizer_path, tokenizer_copy)
    modelfile.write(output, layout, metadata, converted())
    return output


