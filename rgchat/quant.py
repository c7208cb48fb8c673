"""Weight formats behind one interface: every large matrix is a `Linear` or the tied `Embedding`.

f32 and bf16 hold plain weights. int8 stores each matrix as int8 with one bfloat16 scale per output row
(symmetric). int4 stores two 4-bit values per byte with a bfloat16 scale and zero point per group of
INT4_GROUP inputs (asymmetric). Quantized formats run with bfloat16 activations. `swap_modules_` turns a
model built with plain modules into one with quantized modules (gpt-fast's recipe), so the network code
never looks at the format.

On the CPU, products of few rows (decode, short chunks) run through the native kernels of rgchat.gemv
where they are built, and through torch's kernels otherwise.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from rgchat import gemv
from rgchat.errors import RGChatError

PRECISIONS = ("f32", "bf16", "int8", "int4")
QUANTIZED = ("int8", "int4")
# Inputs per int4 scale/zero pair. Larger groups made the products no faster while the weight error grew
# with the group (docs/performance.md), so the smallest group torch's kernels accept wins.
INT4_GROUP = 32
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise RGChatError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    return precision


# What `run` and `pull` convert to unless told. int8 decodes faster than bf16 on every device measured
# (decode is memory-bound and int8 reads half of bf16's bytes), needs less memory, and rounds the weights
# far less than int4, which is faster only on some CPUs (docs/performance.md).
DEFAULT_PRECISION = "int8"


def dtype_of(precision: str) -> torch.dtype:
    """The activation (compute) dtype of a precision: quantized weights run with bfloat16 activations."""
    return DTYPES.get(check_precision(precision), torch.bfloat16)


class Linear(nn.Module):
    """y = x W^T (+ b), W stored [out, in] as in PyTorch and both checkpoint formats."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, device=device), False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class Embedding(nn.Module):
    """The tied [vocab, width] matrix: rows are token embeddings, and x E^T gives the logits."""

    def __init__(self, vocab_size: int, width: int, dtype: torch.dtype, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, width, dtype=dtype, device=device), False)

    def lookup(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, self.weight)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)


def one_sequence(x: torch.Tensor) -> bool:
    """Whether the rows of activations x are tokens of one conversation (a prefill chunk, x [1, T, in]) rather
    than rows of several (a decode step, x [n, 1, in] with n > 1) or rows given flat. A conversation's chunk
    is the same chunk whatever else is being decoded, so its products may take whichever path is fastest;
    only rows of several conversations need the path whose result for a row ignores the other rows."""
    return x.dim() == 3 and x.shape[0] == 1


def native_takes(rows: int, torch_faster: bool = False) -> bool:
    """Whether a CPU product of `rows` activation rows goes to the native kernel: up to gemv.MAX_ROWS always,
    and up to KERNEL_MAX_ROWS unless torch is faster there and may take them, because it computes the same
    numbers (int8 through oneDNN with VNNI runs a chunk far faster than passes of 8 rows) or because the
    rows are one conversation's (`one_sequence`): a row of a batch must not change with the batch it is in."""
    return rows <= gemv.MAX_ROWS or (rows <= KERNEL_MAX_ROWS and not torch_faster)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T (+ b) for plain weights: bfloat16 rows on the CPU through the native kernel where it runs and is
    needed or faster, everything else through torch."""
    rows = x.reshape(-1, x.shape[-1])
    if (x.device.type == "cpu" and (kernels := gemv.cpu_kernels())
            and native_takes(rows.shape[0], one_sequence(x) and cpu_has_bf16())
            and (out := kernels.bf16(rows, weight)) is not None):
        out = out.reshape(*x.shape[:-1], weight.shape[0])
        return out + bias if bias is not None else out
    return row_by_row(lambda r: F.linear(r, weight, bias), x)


# MKL's float32 matrix product on the CPU sums a row's products in an order that depends on how many rows
# are multiplied together, so a conversation decoded beside others would not get the logits it gets alone.
# Up to this many float32 rows (a batched decode step) are therefore multiplied one at a time: each pass
# reads the weights again, so float32 gains nothing from batching on the CPU (bfloat16 and the integer
# formats do, and need no such care).
ROW_BY_ROW_MAX_ROWS = 16


def row_by_row(product, x: torch.Tensor) -> torch.Tensor:
    """product(x) for a row-wise `product` of x [..., in], computed one row at a time where float32 on the
    CPU would otherwise make a row's result depend on its neighbours (rows of several conversations)."""
    rows = x.reshape(-1, x.shape[-1])
    if (x.dtype != torch.float32 or x.device.type != "cpu" or one_sequence(x)
            or not 1 < rows.shape[0] <= ROW_BY_ROW_MAX_ROWS):
        return product(x)
    out = torch.cat([product(rows[i:i + 1]) for i in range(rows.shape[0])])
    return out.reshape(*x.shape[:-1], out.shape[-1])


_ROWS_AT_ONCE = 16384  # quantize big matrices in slices of rows, so temporaries stay small


# --- int8: symmetric, one scale per output row ----------------------------------------------------------

def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float -> (int8 [out, in], bfloat16 scale [out]) with weight ~= q * scale.

    The scale is rounded to bfloat16 before quantizing, since that is the scale the kernels multiply by.
    """
    if weight.shape[0] > _ROWS_AT_ONCE:  # bound the float temporaries (the embedding has 256000 rows)
        parts = [quantize_int8(weight[i:i + _ROWS_AT_ONCE]) for i in range(0, weight.shape[0], _ROWS_AT_ONCE)]
        return torch.cat([q for q, _ in parts]), torch.cat([s for _, s in parts])
    w = weight.float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-10).to(torch.bfloat16)
    q = torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return q.to(dtype) * scale.to(dtype)[:, None]


# Up to this many rows (decode steps, short prefill chunks) the CPU runs a matrix-vector kernel, native or
# torch's (see `int8_matmul`); beyond it, dequantizing and a dense matmul is faster (docs/performance.md).
KERNEL_MAX_ROWS = 64


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The instruction-set flags of this CPU (Linux's /proc/cpuinfo; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            info = f.read(1 << 20)
    except OSError:
        return frozenset()
    return frozenset(info.split())


def cpu_has_vnni() -> bool:
    """Whether this CPU has int8 dot-product instructions (AVX-512 VNNI or AVX-VNNI), on which torch._int_mm
    is fast; without them it is several times slower than torch's bfloat16-activation int8 kernel."""
    return bool(cpu_flags() & {"avx512_vnni", "avx_vnni"})


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX-512 BF16 or AMX); without it a bfloat16 matmul is
    several times slower than a float32 one."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def int8_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Activation rows times int8 weights, all in integers: each row is quantized to int8 with one scale
    (as llama.cpp's quantized matmuls do), multiplied by torch._int_mm (VNNI on x86), and rescaled. The
    activation rounding adds about 1% relative error to each product. The native kernel computes the same
    numbers."""
    xf = x.float()
    x_scale = xf.abs().amax(-1, keepdim=True).clamp(min=1e-12) / 127
    xq = torch.round(xf / x_scale).to(torch.int8)
    return torch._int_mm(xq, q.t()).float() * x_scale * scale.float()


@functools.cache
def _triton_gemv():
    """The Triton matrix-vector kernels for quantized weights (kernels/triton_gemv.py), or None without Triton."""
    try:
        from rgchat.kernels import triton_gemv
    except ImportError:
        return None
    return triton_gemv


def _int8_cpu(rows: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor | None:
    """Few rows on the CPU: the native kernel, else torch's integer kernel where it is fast (VNNI; the
    same numbers), else torch's bfloat16-activation kernel; None where none takes these tensors."""
    if (native_takes(rows.shape[0], cpu_has_vnni()) and (kernels := gemv.cpu_kernels())
            and (out := kernels.int8(rows, q, scale)) is not None):
        return out
    if cpu_has_vnni():
        return int8_reference(rows, q, scale).to(rows.dtype)
    if q.data_ptr() % 16 == 0:  # torch's kernel crashes on weights that are not 16-byte aligned
        return torch._weight_int8pack_mm(rows.to(torch.bfloat16).contiguous(), q, scale).to(rows.dtype)
    return None


def int8_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [..., in] @ (q * scale)^T without materialising the float weight when x has few rows.

    On the CPU one kernel serves every row count up to KERNEL_MAX_ROWS, and on CUDA one Triton kernel every
    count up to its MAX_ROWS, so a row's result does not depend on how many rows are multiplied with it
    (conversations decoded together get what they get alone)."""
    rows = x.reshape(-1, x.shape[-1])
    out = None
    if x.device.type == "cpu" and rows.shape[0] <= KERNEL_MAX_ROWS:
        out = _int8_cpu(rows, q, scale)
    elif (x.device.type == "cuda" and (kernels := _triton_gemv()) is not None
          and rows.shape[0] <= kernels.MAX_ROWS and rows.dtype == torch.bfloat16):
        out = kernels.int8_rows(rows, q, scale)
    if out is None:  # many rows: dequantize (to float32 on a CPU without native bfloat16 products) and multiply
        dtype = torch.float32 if x.device.type == "cpu" and not cpu_has_bf16() else x.dtype
        out = (F.linear(rows.to(dtype), q.to(dtype)) * scale.to(dtype)).to(x.dtype)
    return out.reshape(*x.shape[:-1], q.shape[0])


class _Int8Weight(nn.Module):
    """int8 storage: weight [out, in] with one bfloat16 scale per output row. `prepare()` moves the weight,
    on a CPU whose native int8 product is faster from it, into the packed layout (`gemv.pack_int8`); the
    stored copy is then dropped, and every product of any number of rows reads the packed one."""

    def __init__(self, out_features: int, in_features: int, device=None):
        super().__init__()
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.empty(out_features, dtype=torch.bfloat16, device=device))
        self.packed: torch.Tensor | None = None

    def prepare(self) -> None:
        kernels = gemv.cpu_kernels() if self.weight.device.type == "cpu" else None
        if self.packed is None and kernels and kernels.packs_int8(self.weight):
            self.packed = gemv.pack_int8(self.weight)
            # no longer read: free it (for a model file, the file's pages)
            self.weight = torch.empty(0, self.weight.shape[1], dtype=torch.int8)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            return int8_matmul(x, self.weight, self.scale)
        rows = x.reshape(-1, x.shape[-1])
        out = kernels.int8_packed(rows, self.packed, self.scale) if (kernels := gemv.cpu_kernels()) else None
        if out is None:  # the native products turned off since: torch's integer product, the same numbers
            out = int8_reference(rows, gemv.unpack_int8(self.packed), self.scale).to(x.dtype)
        return out.reshape(*x.shape[:-1], -1)


class Int8Linear(_Int8Weight):
    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, device=None):
        super().__init__(out_features, in_features, device)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.matmul(x)
        return out + self.bias if self.bias is not None else out


class Int8Embedding(_Int8Weight):
    def __init__(self, vocab_size: int, width: int, dtype: torch.dtype, device=None):
        super().__init__(vocab_size, width, device)
        self.dtype = dtype

    def lookup(self, tokens: torch.Tensor) -> torch.Tensor:
        # only the rows asked for are read and dequantized
        rows = self.weight[tokens] if self.packed is None else gemv.packed_int8_rows(self.packed, tokens)
        return rows.to(self.dtype) * self.scale[tokens, None].to(self.dtype)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x)


# --- int4: asymmetric, groups of INT4_GROUP inputs, two values per byte --------------------------------

def quantize_int4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[out, in] float -> (uint8 [out, in/2], scale, zero: bfloat16 [out, in/group]).

    weight ~= (q - 8) * scale + zero with q in 0..15; byte j holds q[2j] (low nibble) and q[2j+1] (high).
    """
    out_features, in_features = weight.shape
    group = INT4_GROUP
    if in_features % group:
        raise RGChatError(f"int4 needs an input width divisible by {group}, not {in_features}")
    if out_features > _ROWS_AT_ONCE:  # bound the float temporaries
        parts = [quantize_int4(weight[i:i + _ROWS_AT_ONCE]) for i in range(0, out_features, _ROWS_AT_ONCE)]
        return tuple(torch.cat(column) for column in zip(*parts))
    w = weight.float().reshape(out_features, -1, group)
    low, high = w.amin(-1), w.amax(-1)
    scale = ((high - low).clamp(min=1e-10) / 15).to(torch.bfloat16)
    zero = (low + scale.float() * 8).to(torch.bfloat16)
    q = torch.round((w - zero.float()[..., None]) / scale.float()[..., None] + 8).clamp(0, 15)
    q = q.to(torch.uint8).reshape(out_features, in_features)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous(), scale, zero


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., in/2] -> the 4-bit values as int32 [..., in]."""
    values = torch.stack([packed & 0x0F, packed >> 4], dim=-1)
    return values.reshape(*packed.shape[:-1], -1).to(torch.int32)


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    q = unpack_int4(packed).to(torch.float32)
    group = q.shape[-1] // scale.shape[-1]
    s, z = (t.float().repeat_interleave(group, dim=-1) for t in (scale, zero))
    return ((q - 8) * s + z).to(dtype)


_PACK_ROWS = 4096  # torch's CPU int4 packing is local to blocks of 64 rows: pack big matrices piecewise


class _Int4Weight(nn.Module):
    """int4 storage plus, once `prepare()` ran, what the device's matmul wants: on CPU the stored int4 itself
    for the native kernel, or else torch's packed int4 layout (bf16 activations, tensors with rows a
    multiple of 16); on CUDA the stored int4 itself (Triton kernels read it for up to MAX_ROWS rows, longer
    inputs dequantize per call); elsewhere a dequantized bf16 copy."""

    def __init__(self, out_features: int, in_features: int, device=None):
        super().__init__()
        groups = in_features // INT4_GROUP
        self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scale", torch.empty(out_features, groups, dtype=torch.bfloat16, device=device))
        self.register_buffer("zero", torch.empty(out_features, groups, dtype=torch.bfloat16, device=device))
        self.runtime: tuple = ()

    @property
    def group(self) -> int:
        return self.weight.shape[1] * 2 // self.scale.shape[1]

    def prepare(self) -> None:
        """Build the runtime form. Linear layers then drop their stored copy; the embedding keeps it for
        row lookups."""
        rows, half = self.weight.shape
        kernels = gemv.cpu_kernels() if self.weight.device.type == "cpu" else None
        if kernels and kernels.takes_int4(self.weight, self.scale, self.zero):
            self.runtime = ("native", self.weight, self.scale, self.zero, kernels)
        elif self.weight.device.type == "cpu" and rows % 16 == 0:
            step = _PACK_ROWS if rows % 64 == 0 else rows
            values = torch.empty(min(step, rows), half, 2, dtype=torch.int32)  # reused: no fresh pages per slice
            parts = []
            for i in range(0, rows, step):
                chunk = self.weight[i:i + step]
                n = chunk.shape[0]
                torch.bitwise_and(chunk, 0x0F, out=values[:n, :, 0])
                torch.bitwise_right_shift(chunk, 4, out=values[:n, :, 1])
                parts.append(torch._convert_weight_to_int4pack_for_cpu(values[:n].view(n, 2 * half), 1))
            scales_and_zeros = torch.stack([self.scale, self.zero], dim=-1).transpose(0, 1).contiguous()
            self.use_packed(torch.cat(parts), scales_and_zeros)
        elif self.weight.device.type == "cuda" and _triton_gemv() is not None:
            self.runtime = ("cuda", self.weight, self.scale, self.zero)
        else:
            self.runtime = ("dense", dequantize_int4(self.weight, self.scale, self.zero, torch.bfloat16))
            self._drop_storage()

    def use_packed(self, packed: torch.Tensor, scales_and_zeros: torch.Tensor) -> None:
        """Run from torch's packed CPU layout (built by `prepare`, or read back from a cache)."""
        self.runtime = ("cpu", packed, scales_and_zeros)
        self._drop_storage()

    def _drop_storage(self) -> None:
        if isinstance(self, Int4Linear):  # no longer read: free it (a slice would keep its storage alive)
            self.weight = torch.empty(0, self.weight.shape[1], dtype=torch.uint8, device=self.weight.device)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if not self.runtime:
            raise RuntimeError("int4 weights used before prepare_model_()")
        rows = x.reshape(-1, x.shape[-1])
        if self.runtime[0] == "native":
            out = self.runtime[4].int4(rows, *self.runtime[1:4])
            if out is None:  # activations the kernel does not take
                out = F.linear(rows, dequantize_int4(*self.runtime[1:4], rows.dtype))
        elif self.runtime[0] == "cpu":
            out = torch._weight_int4pack_mm_for_cpu(rows.to(torch.bfloat16).contiguous(), self.runtime[1],
                                                    self.group, self.runtime[2]).to(x.dtype)
        elif self.runtime[0] == "cuda":
            if rows.shape[0] == 1:
                out = _triton_gemv().int4_gemv(rows, *self.runtime[1:])
            elif rows.shape[0] <= _triton_gemv().MAX_ROWS and rows.dtype == torch.bfloat16:
                out = _triton_gemv().int4_rows(rows, *self.runtime[1:])
            else:  # prefill: dequantizing costs little next to a matrix product over many rows
                out = F.linear(rows, dequantize_int4(*self.runtime[1:], rows.dtype))
        else:
            out = F.linear(rows, self.runtime[1].to(x.dtype))
        return out.reshape(*x.shape[:-1], -1)


class Int4Linear(_Int4Weight):
    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, device=None):
        super().__init__(out_features, in_features, device)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.matmul(x)
        return out + self.bias if self.bias is not None else out


class Int4Embedding(_Int4Weight):
    def __init__(self, vocab_size: int, width: int, dtype: torch.dtype, device=None):
        super().__init__(vocab_size, width, device)
        self.dtype = dtype

    def lookup(self, tokens: torch.Tensor) -> torch.Tensor:
        return dequantize_int4(self.weight[tokens], self.scale[tokens], self.zero[tokens], self.dtype)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x)


def swap_modules_(model: nn.Module, precision: str) -> nn.Module:
    """Replace every plain Linear/Embedding by its quantized twin (empty, on the meta device)."""
    if precision not in QUANTIZED:
        return model
    dtype = dtype_of(precision)
    linear, embedding = (Int8Linear, Int8Embedding) if precision == "int8" else (Int4Linear, Int4Embedding)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Linear):
                out_features, in_features = child.weight.shape
                new = linear(in_features, out_features, child.bias is not None, dtype, "meta")
            elif isinstance(child, Embedding):
                new = embedding(*child.weight.shape, dtype, "meta")
            else:
                continue
            setattr(parent, name, new)
    return model


def fuse_linears(linears: list[nn.Module]) -> nn.Module | None:
    """One module computing several projections of the same input at once (outputs concatenated): one long
    matrix read and one launch instead of several short ones. None for formats whose layout does not
    concatenate by rows (int4's packed runtime forms). int8 weights that the CPU kernel packs are packed
    straight into the joined matrix; weights packed already are unpacked, joined and packed again."""
    kind = type(linears[0])
    if kind not in (Linear, Int8Linear) or any(type(m) is not kind or (m.bias is None) != (linears[0].bias is None)
                                                for m in linears):
        return None
    parts = [m.state_dict() for m in linears]
    was_packed = [getattr(m, "packed", None) is not None for m in linears]
    weights = [gemv.unpack_int8(m.packed) if packed else part["weight"]
               for m, part, packed in zip(linears, parts, was_packed, strict=True)]
    for part in parts:
        del part["weight"]
    tensors = {name: torch.cat([p[name] for p in parts]) for name in parts[0]}  # scales, biases
    in_features, out_features = weights[0].shape[1], sum(w.shape[0] for w in weights)
    kernels = gemv.cpu_kernels() if kind is Int8Linear and weights[0].device.type == "cpu" else None
    packs = bool(kernels) and all(kernels.packs_int8(w) for w in weights)
    tensors["weight"] = (torch.empty(out_features, in_features, dtype=torch.int8, device="meta") if packs
                         else torch.cat(weights))
    bias = tensors.get("bias")
    dtype = bias.dtype if bias is not None else linears[0].weight.dtype
    fused = kind(in_features, out_features, bias is not None, dtype, "meta")
    fused.load_state_dict(tensors, assign=True, strict=True)
    if packs:
        fused.packed, fused.weight = gemv.pack_int8(*weights), torch.empty(0, in_features, dtype=torch.int8)
    elif any(was_packed):
        fused.prepare()
    return fused


def quantizable_weights(model: nn.Module) -> set[str]:
    """Names of the matrices a quantized format stores as integers (all Linear weights and the embedding)."""
    return {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, (Linear, Embedding))}


def convert_tensor(name: str, tensor: torch.Tensor, precision: str, quantizable: set[str]) -> dict[str, torch.Tensor]:
    """One source tensor -> the tensors a file of `precision` stores for it."""
    prefix = name.removesuffix("weight")
    if precision == "int8" and name in quantizable:
        q, scale = quantize_int8(tensor)
        return {name: q, prefix + "scale": scale}
    if precision == "int4" and name in quantizable:
        q, scale, zero = quantize_int4(tensor)
        return {name: q, prefix + "scale": scale, prefix + "zero": zero}
    return {name: tensor.to(dtype_of(precision)).contiguous()}


def runtime_tensors(model: nn.Module) -> list[torch.Tensor]:
    """The weight tensors the forward pass reads: plain parameters and buffers, except that prepared int4
    modules count their runtime form instead of their stored form."""
    tensors, skip = [], set()
    for module in model.modules():
        if isinstance(module, _Int4Weight) and module.runtime:
            tensors += [t for t in module.runtime if isinstance(t, torch.Tensor)]
            skip |= {id(module.weight), id(module.scale), id(module.zero)}
        elif isinstance(module, _Int8Weight) and module.packed is not None:
            tensors.append(module.packed)
    return tensors + [t for t in model.state_dict(keep_vars=True).values() if id(t) not in skip]


def prepare_model_(model: nn.Module, packed: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Ready quantized weights for their device once loaded: int8 packs for the native CPU kernel where it
    reads that layout; int4 repacks for torch's CPU kernel, or takes the packed tensors from `packed` (what
    `packed_tensors` returned for the same weights earlier)."""
    for name, module in model.named_modules():
        if isinstance(module, _Int4Weight):
            if packed is not None and f"{name}.packed" in packed:
                module.use_packed(packed[f"{name}.packed"], packed[f"{name}.scales_and_zeros"])
            else:
                module.prepare()
        elif isinstance(module, _Int8Weight):
            module.prepare()
    return model


def packs_int8_weights(model: nn.Module) -> bool:
    """Whether `prepare_model_` will pack int8 weights of this model for the native CPU kernel."""
    kernels = gemv.cpu_kernels()
    return bool(kernels) and any(isinstance(m, _Int8Weight) and m.packed is None and kernels.packs_int8(m.weight)
                                 for m in model.modules())


def runs_from_copies(model: nn.Module) -> bool:
    """Whether `prepare_model_` moved any int8 weights into packed copies (what was loaded is no longer read)."""
    return any(isinstance(m, _Int8Weight) and m.packed is not None for m in model.modules())


def int4_runs_native() -> bool:
    """Whether int4 on this CPU runs through the native kernel, from the stored layout (no repacking)."""
    return bool((kernels := gemv.cpu_kernels()) and "int4" in kernels.paths)


def packed_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The int4 modules' packed CPU tensors by name, to cache them (repacking a 2B model takes seconds)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, _Int4Weight) and module.runtime and module.runtime[0] == "cpu":
            out[f"{name}.packed"], out[f"{name}.scales_and_zeros"] = module.runtime[1:]
    return out


def quantize_model(model: nn.Module, precision: str) -> nn.Module:
    """Quantize a float model in memory, as conversion does to a checkpoint."""
    if precision not in QUANTIZED:
        return model
    quantizable = quantizable_weights(model)
    weights: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        weights.update(convert_tensor(name, tensor, precision, quantizable))
    swap_modules_(model, precision)
    model.load_state_dict(weights, assign=True, strict=True)
    return prepare_model_(model)
