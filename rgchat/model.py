"""The Griffin network (RecurrentGemma): residual blocks of RG-LRU recurrence or local attention, plus MLPs.

The model owns weights only. All per-conversation memory lives in a `State` that every call reads and
updates in place, so `prefill` can continue any conversation, and `decode` gives the next token of several
conversations at once (one row each, every conversation at its own position).

Activations are [n, T, width]: n conversations of T new tokens each. A prefill chunk has n = 1 (a `Chunk`
of one State), a decode step T = 1 over the n rows of a State pool (`State.pool`, a `RowsStep`). Only the
conv, the RG-LRU and attention look across tokens, and attention runs per row: a row's arithmetic never
depends on the other rows. In the form a CUDA graph captures (`decode_rows`) no shape depends on the
positions either.
Parameter names match Hugging Face transformers' (without the `model.` prefix).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from rgchat.config import RECURRENT, GriffinConfig
from rgchat import gemv
from rgchat.quant import (Embedding, Linear, cpu_has_bf16, fuse_linears, native_takes, one_sequence,
                          packs_int8_weights, prepare_model_, row_by_row)
from rgchat.scan import rglru
from rgchat.step_ops import DTYPES, StepOps, step_ops
from rgchat.state import AttentionLayerState, LayerState, RecurrentLayerState, State

# Tokens per prefill chunk: bounds activations and attention masks for any prompt. A GPU wants more work
# per launch, and has the memory for it.
PREFILL_CHUNK = {"cpu": 512}
PREFILL_CHUNK_ACCELERATOR = 4096


def _param(*shape: int, dtype: torch.dtype, device) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


def gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


class RMSNorm(nn.Module):
    """x / rms(x) * (1 + scale), computed in the activation dtype as the official implementation does (a
    native CPU decode step computes it in float32 and rounds once: rgchat/step_ops.py)."""

    def __init__(self, width: int, eps: float, dtype: torch.dtype, device=None):
        super().__init__()
        self.eps = eps
        self.weight = _param(width, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, native: StepOps | None = None) -> torch.Tensor:
        if native is not None:
            return native.rms_norm(x, self.weight, self.eps)
        var = x.square().mean(-1, keepdim=True)
        return x * torch.rsqrt(var + self.eps) * (self.weight + 1)


@dataclasses.dataclass
class Chunk:
    """What every layer needs to know about the tokens being processed, computed once per forward."""

    start: int  # position of the first token
    cos: torch.Tensor  # [T, head_dim/4] RoPE tables, in the activation dtype
    sin: torch.Tensor
    mask: torch.Tensor  # [T, keys] bool: which keys each query may see


@dataclasses.dataclass
class RowsStep:
    """One token for each of n conversations, the rows of a State pool, at their positions."""

    cos: torch.Tensor  # [n, head_dim/4] RoPE tables, in the activation dtype
    sin: torch.Tensor
    mask: torch.Tensor | None  # [n, window + 1] bool: the ring slots each query may see, then its own key
    slot: torch.Tensor  # [n] the ring slot each new key goes to
    rows: torch.Tensor  # [n] the pool row of each conversation
    # Whether `rows` picks some rows of the pool (gathered and scattered back) rather than all of them.
    gather: bool = False
    # Where the positions are known on the host (an eager step): the pool rows again, and the ring slots
    # filled in each, which attention then reads alone (and `mask` is None). None in a step for a CUDA graph,
    # whose positions live on the device: it reads every whole ring buffer under `mask`, so that no shape
    # depends on them.
    host_rows: list[int] | None = None
    filled: list[int] | None = None
    key_masks: list[torch.Tensor | None] | None = None  # per row: which of its padded keys are real
    padding: torch.Tensor | None = None  # zero keys to pad with [KEY_BLOCK - 1, kv_heads, head_dim]
    # In an eager CPU step: the native operations that do the element-wise work between the products
    # (rgchat/step_ops.py), and `filled` as a tensor for them. None where torch's operations do it.
    native: StepOps | None = None
    filled_rows: torch.Tensor | None = None


def _native_layout(pool: State, dtype: torch.dtype) -> bool:
    """Whether the native step operations can update `pool` in place: contiguous tensors, the RG-LRU carries
    in float32 and the rest in the activation dtype."""
    for layer in pool.layers:
        for field in dataclasses.fields(layer):
            t = getattr(layer, field.name)
            if not t.is_contiguous() or t.dtype != (torch.float32 if field.name == "h" else dtype):
                return False
    return True


# Until its window is full, a row of an eager decode step attends over a multiple of this many keys, the
# padding masked: torch's CPU bfloat16 product builds a kernel for every new shape, which costs several
# times the product itself, and each step would otherwise meet a new number of keys.
KEY_BLOCK = 64


Step = Chunk | RowsStep  # what the layers are told of the tokens


class MLP(nn.Module):
    def __init__(self, cfg: GriffinConfig, dtype: torch.dtype, device=None):
        super().__init__()
        self.gate_proj = Linear(cfg.width, cfg.mlp_width, True, dtype, device)
        self.up_proj = Linear(cfg.width, cfg.mlp_width, True, dtype, device)
        self.down_proj = Linear(cfg.mlp_width, cfg.width, True, dtype, device)
        self.gate_up_proj = None  # gate_proj and up_proj as one matrix, once fuse_projections_ ran

    def forward(self, x: torch.Tensor, native: StepOps | None = None) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(native.gelu_mul(gate, up) if native is not None else gelu(gate) * up)


class RGLRU(nn.Module):
    """Real-gated linear recurrent unit with block-diagonal gates (c = 8)."""

    def __init__(self, cfg: GriffinConfig, dtype: torch.dtype, device=None):
        super().__init__()
        heads, block = cfg.num_heads, cfg.lru_width // cfg.num_heads
        self.recurrent_param = _param(cfg.lru_width, dtype=dtype, device=device)
        self.input_gate_weight = _param(heads, block, block, dtype=dtype, device=device)
        self.input_gate_bias = _param(heads, block, dtype=dtype, device=device)
        self.recurrent_gate_weight = _param(heads, block, block, dtype=dtype, device=device)
        self.recurrent_gate_bias = _param(heads, block, dtype=dtype, device=device)
        self.gate_rows: tuple | None = None  # both gates as [out, in] rows per head, once the native kernel ran
        self._a_scale: tuple | None = None  # (recurrent_param, its data's address, its version, its a_scale)

    def a_scale(self) -> torch.Tensor:
        """-8 softplus(recurrent_param) in float32 [L]: computed at first use and kept while the parameter
        holds the same values (native decode steps; traced steps compute it in their graph)."""
        param, cached = self.recurrent_param, self._a_scale
        # .to() swaps the data; load_state_dict copies into it, which moves its version on
        if cached is None or cached[0] is not param or cached[1:3] != (param.data_ptr(), param._version):
            self._a_scale = cached = (param, param.data_ptr(), param._version, -8.0 * F.softplus(param.float()))
        return cached[3]

    def gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both gates of x [n, T, L] as [n * T, L], before their sigmoid. On the CPU, bfloat16 gates of few
        rows run through the native kernel, which wants each head's block as [out, in] rows: transposed
        copies (a small part of the weights), made at first use, beside the originals that longer chunks use."""
        rows = x.reshape(-1, x.shape[-1])
        if (rows.device.type == "cpu" and self.input_gate_weight.dtype == torch.bfloat16
                and (kernels := gemv.cpu_kernels()) and "bf16" in kernels.paths
                and native_takes(rows.shape[0], one_sequence(x) and cpu_has_bf16())):
            if self.gate_rows is None:
                self.gate_rows = tuple(w.transpose(1, 2).contiguous().view(-1, w.shape[1])
                                       for w in (self.input_gate_weight, self.recurrent_gate_weight))
            heads = self.input_gate_weight.shape[0]
            gate_x, gate_a = (kernels.bf16(rows, w, heads) for w in self.gate_rows)
            if gate_x is not None and gate_a is not None:
                return gate_x + self.input_gate_bias.view(-1), gate_a + self.recurrent_gate_bias.view(-1)
        def gate(weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
            return row_by_row(lambda r: self._gate(r.reshape(-1, r.shape[-1]), weight, bias), x).reshape(rows.shape)
        return gate(self.input_gate_weight, self.input_gate_bias), gate(self.recurrent_gate_weight,
                                                                         self.recurrent_gate_bias)

    def _gate(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        # x [rows, L] as xb [heads, rows, block] @ weight [heads, block, block] -> [rows, L], before the sigmoid
        xb = x.view(x.shape[0], weight.shape[0], -1).transpose(0, 1)
        out = torch.baddbmm(bias[:, None, :], xb, weight)
        return out.transpose(0, 1).reshape(x.shape[0], -1)

    def forward(self, x: torch.Tensor, h: torch.Tensor, at_start: bool) -> torch.Tensor:
        """x [n, T, L] from the carries h [n, L] (updated in place); at_start: the chunk starts a document
        (n = 1 only: a decode step always continues one)."""
        n, T, L = x.shape
        rows = x.reshape(n * T, L)
        gate_x, gate_a = self.gates(x)
        a_scale = -8.0 * F.softplus(self.recurrent_param.float())
        reset = None
        if at_start:  # a document starts at the first token of this chunk
            reset = torch.zeros(T, dtype=torch.bool, device=x.device)
            reset[0] = True
        if n == 1:
            return rglru(rows, gate_x, gate_a, a_scale, h[0], reset).view(n, T, L)
        # One token per conversation: every (conversation, channel) pair is a channel of one scan step.
        assert T == 1, "several conversations advance one token at a time"
        flat = lambda t: t.view(1, n * L)  # noqa: E731
        return rglru(flat(rows), flat(gate_x), flat(gate_a), a_scale.repeat(n), h.view(n * L)).view(n, T, L)


class RecurrentBlock(nn.Module):
    def __init__(self, cfg: GriffinConfig, dtype: torch.dtype, device=None):
        super().__init__()
        self.linear_y = Linear(cfg.width, cfg.lru_width, True, dtype, device)
        self.linear_x = Linear(cfg.width, cfg.lru_width, True, dtype, device)
        self.linear_out = Linear(cfg.lru_width, cfg.width, True, dtype, device)
        self.conv_1d = nn.Module()
        self.conv_1d.weight = _param(cfg.lru_width, 1, cfg.conv_width, dtype=dtype, device=device)
        self.conv_1d.bias = _param(cfg.lru_width, dtype=dtype, device=device)
        self.rg_lru = RGLRU(cfg, dtype, device)
        self.linear_yx = None  # linear_y and linear_x as one matrix, once fuse_projections_ ran

    def forward(self, x: torch.Tensor, state: RecurrentLayerState, step: Step) -> torch.Tensor:
        """x [1, T, width] of one conversation's chunk, or [n, 1, width] of the n rows of a pool."""
        if self.linear_yx is not None:
            y, u = self.linear_yx(x).chunk(2, dim=-1)
        else:
            y, u = self.linear_y(x), self.linear_x(x)
        if isinstance(step, RowsStep) and step.native is not None:
            return self._native_step(y, u, state, step, step.native)
        y = gelu(y)
        chunk = step if isinstance(step, Chunk) else None
        if chunk is not None:  # [1, ...] views of the conversation's state, updated in place
            conv_state, h = state.conv[None], state.h[None]
        elif step.gather:  # copies of the rows decoded, written back below
            conv_state, h = state.conv.index_select(0, step.rows), state.h.index_select(0, step.rows)
        else:  # the pool's rows themselves
            conv_state, h = state.conv, state.h
        # Causal depthwise conv over [previous inputs, this chunk]: out_t = b + sum_k w[k] * u_{t-(width-1)+k}.
        window = torch.cat([conv_state, u], dim=1)  # [n, width - 1 + T, L]
        w = self.conv_1d.weight[:, 0, :]
        T, width = u.shape[1], w.shape[1]
        conv = self.conv_1d.bias + sum(window[:, k:k + T] * w[:, k] for k in range(width))
        conv_state.copy_(window[:, T:])
        u = self.rg_lru(conv, h, at_start=chunk is not None and chunk.start == 0)
        if chunk is None and step.gather:
            state.conv.index_copy_(0, step.rows, conv_state)
            state.h.index_copy_(0, step.rows, h)
        return self.linear_out(u * y)

    def _native_step(self, y: torch.Tensor, u: torch.Tensor, state: RecurrentLayerState, step: RowsStep,
                     native: StepOps) -> torch.Tensor:
        """forward's work for one token of each row, y and u [n, 1, L] before the gelu and the conv, the
        element-wise parts in native calls."""
        conv_state, h = state.conv, state.h
        if step.gather:
            conv_state, h = conv_state.index_select(0, step.rows), h.index_select(0, step.rows)
        conv = native.conv(u, conv_state, self.conv_1d.weight[:, 0, :], self.conv_1d.bias)
        gate_x, gate_a = self.rg_lru.gates(conv)
        mixed = native.rglru_gelu(conv, gate_x, gate_a, self.rg_lru.a_scale(), h, y)
        if step.gather:
            state.conv.index_copy_(0, step.rows, conv_state)
            state.h.index_copy_(0, step.rows, h)
        return self.linear_out(mixed)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first half of each head (rotate-half convention); x [T, heads, head_dim], the tables
    cos and sin [T, head_dim/4] in x's dtype."""
    quarter = cos.shape[-1]
    x1, x2, rest = x[..., :quarter], x[..., quarter:2 * quarter], x[..., 2 * quarter:]
    cos, sin = cos[:, None, :], sin[:, None, :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
           mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of q [T, heads, hd] over keys and values [S, kv_heads, hd] where mask [T, S] allows (all of
    them where it is None); query heads share key/value heads in consecutive groups. Returns [T, heads, hd].

    A chunk on CUDA goes through scaled_dot_product_attention (fused kernels). One token, and everything on
    other devices, is two einsums: they read the shared key/value heads once, where SDPA's grouped path
    (under torch.compile) copies them out for every query head; on the CPU torch's SDPA is far slower than
    the einsums for one token over a full window (docs/performance.md)."""
    if q.device.type == "cpu" and q.dtype == torch.bfloat16 and not cpu_has_bf16():
        # torch's bfloat16 batched products on such a CPU are several times slower than float32 ones
        return attend(q.float(), keys.float(), values.float(), mask).to(q.dtype)
    T, heads, head_dim = q.shape
    kv_heads = keys.shape[1]
    if q.device.type == "cuda" and T > 1:
        out = F.scaled_dot_product_attention(q.transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1),
                                             attn_mask=mask, enable_gqa=True)
        return out.transpose(0, 1)
    qg = q.view(T, kv_heads, heads // kv_heads, head_dim).permute(1, 2, 0, 3)  # [kv, group, T, hd]
    scores = torch.einsum("kgtd,skd->kgts", qg, keys) * head_dim ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return torch.einsum("kgts,skd->tkgd", probs, values).reshape(T, heads, head_dim)


def attend_ring(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ring_k: torch.Tensor, ring_v: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
    """One token of each of n conversations: q [n, heads, hd] over its ring buffers ring_k, ring_v
    [n, window, kv_heads, hd] and its own new key and value k, v [n, kv_heads, hd], where mask [n, window + 1]
    allows. The new key is scored apart from the ring, so the ring is read once and never copied."""
    n, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    qg = q.view(n, kv_heads, heads // kv_heads, head_dim)
    scores = torch.cat([torch.einsum("nkgd,nskd->nkgs", qg, ring_k),
                        torch.einsum("nkgd,nkd->nkg", qg, k)[..., None]], dim=-1) * head_dim ** -0.5
    scores = scores.masked_fill(~mask[:, None, None, :], torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    out = torch.einsum("nkgs,nskd->nkgd", probs[..., :-1], ring_v) + probs[..., -1:] * v[:, :, None, :]
    return out.reshape(n, heads, head_dim)


class AttentionBlock(nn.Module):
    """Local multi-query attention over a ring buffer of the last `window` keys and values."""

    def __init__(self, cfg: GriffinConfig, dtype: torch.dtype, device=None):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        kv_width = cfg.num_kv_heads * cfg.head_dim
        self.q_proj = Linear(cfg.width, cfg.width, False, dtype, device)
        self.k_proj = Linear(cfg.width, kv_width, False, dtype, device)
        self.v_proj = Linear(cfg.width, kv_width, False, dtype, device)
        self.o_proj = Linear(cfg.width, cfg.width, True, dtype, device)
        self.qkv_proj = None  # q_proj, k_proj and v_proj as one matrix, once fuse_projections_ ran

    def forward(self, x: torch.Tensor, state: AttentionLayerState, step: Step) -> torch.Tensor:
        if self.qkv_proj is not None:
            kv_width = self.kv_heads * self.head_dim
            q, k, v = self.qkv_proj(x).split([self.heads * self.head_dim, kv_width, kv_width], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if isinstance(step, RowsStep) and step.native is not None:  # RoPE, attention and the ring in one call
            out = step.native.attention(q, k, v, state.k, state.v, step.cos, step.sin, step.rows, step.filled_rows,
                                        step.slot, self.heads)
            return self.o_proj(out)
        tokens = x.shape[0] * x.shape[1]  # a chunk's T tokens, or a step's n rows: one RoPE table row each
        q = apply_rope(q.reshape(tokens, self.heads, self.head_dim), step.cos, step.sin)
        k = apply_rope(k.reshape(tokens, self.kv_heads, self.head_dim), step.cos, step.sin)
        v = v.reshape(tokens, self.kv_heads, self.head_dim)
        if isinstance(step, Chunk):
            return self.o_proj(self._attend(q, k, v, state, step)[None])
        return self.o_proj(self._attend_rows(q, k, v, state, step)[:, None])

    def _attend_rows(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pool: AttentionLayerState,
                     step: RowsStep) -> torch.Tensor:
        """One token of each pool row (rotated q [n, heads, hd], k and v [n, kv_heads, hd]) against its ring
        buffer; returns [n, width]."""
        n = q.shape[0]
        if step.filled is None:
            out = attend_ring(q, k, v, pool.k, pool.v, step.mask).reshape(n, -1)
        else:  # each row over its filled ring slots and its new key (all within the window), then padding
            rows = []
            for i, (r, f, mask) in enumerate(zip(step.host_rows, step.filled, step.key_masks, strict=True)):
                pad = step.padding[:0 if mask is None else mask.shape[-1] - f - 1]
                rows.append(attend(q[i:i + 1], torch.cat([pool.k[r, :f], k[i:i + 1], pad]),
                                   torch.cat([pool.v[r, :f], v[i:i + 1], pad]), mask))
            out = torch.cat(rows).reshape(n, -1)
        pool.k.index_put_((step.rows, step.slot), k)  # then remember the new key and value
        pool.v.index_put_((step.rows, step.slot), v)
        return out

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: AttentionLayerState,
                chunk: Chunk) -> torch.Tensor:
        """One conversation's T new tokens (rotated q [T, heads, hd], k and v [T, kv_heads, hd]) against its
        ring buffer; returns [T, width]."""
        T = q.shape[0]
        window = state.k.shape[0]
        cached = min(chunk.start, window)  # filled ring slots (all of them once the window is full)
        keys, values = torch.cat([state.k[:cached], k]), torch.cat([state.v[:cached], v])  # [S, kv, hd]
        out = attend(q, keys, values, chunk.mask).reshape(T, -1)

        # Remember the newest keys and values; only the last `window` of a long chunk can matter later.
        keep = min(T, window)
        slots = torch.arange(chunk.start + T - keep, chunk.start + T, device=q.device) % window
        state.k.index_copy_(0, slots, k[T - keep:])
        state.v.index_copy_(0, slots, v[T - keep:])
        return out


class ResidualBlock(nn.Module):
    def __init__(self, cfg: GriffinConfig, kind: str, dtype: torch.dtype, device=None):
        super().__init__()
        self.temporal_pre_norm = RMSNorm(cfg.width, cfg.rms_eps, dtype, device)
        block = RecurrentBlock if kind == RECURRENT else AttentionBlock
        self.temporal_block = block(cfg, dtype, device)
        self.channel_pre_norm = RMSNorm(cfg.width, cfg.rms_eps, dtype, device)
        self.mlp_block = MLP(cfg, dtype, device)

    def forward(self, x: torch.Tensor, state: LayerState, step: Step) -> torch.Tensor:
        native = step.native if isinstance(step, RowsStep) else None
        r = x + self.temporal_block(self.temporal_pre_norm(x, native), state, step)
        return r + self.mlp_block(self.channel_pre_norm(r, native), native)


class Griffin(nn.Module):
    def __init__(self, config: GriffinConfig, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.config = config
        self.embed_tokens = Embedding(config.vocab_size, config.width, dtype, device)
        self.layers = nn.ModuleList(ResidualBlock(config, kind, dtype, device) for kind in config.block_types)
        self.final_norm = RMSNorm(config.width, config.rms_eps, dtype, device)
        self.embed_scale = config.embed_scale  # a plain float, computed once (torch.compile traces the step)

    @property
    def dtype(self) -> torch.dtype:
        return self.final_norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.final_norm.weight.device

    def new_state(self) -> State:
        return State.empty(self.config, self.dtype, self.device)

    def _inv_freq(self) -> torch.Tensor:
        # RoPE rotates the first half of each head as two quarters: frequencies base^(-2i / half).
        half = self.config.head_dim // 2
        return self.config.rope_base ** (-torch.arange(0, half, 2, device=self.device, dtype=torch.float32) / half)

    def _chunk(self, start: int, length: int) -> Chunk:
        device, window = self.device, self.config.window
        q_pos = torch.arange(start, start + length, device=device)
        angles = q_pos[:, None].float() * self._inv_freq()
        cached = min(start, window)
        # Ring slot s holds the latest position p < start with p % window == s.
        slot_pos = start - 1 - (start - 1 - torch.arange(cached, device=device)) % window
        k_pos = torch.cat([slot_pos, q_pos])
        mask = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] >= q_pos[:, None] - window)
        return Chunk(start, angles.cos().to(self.dtype), angles.sin().to(self.dtype), mask)

    def _rows_step(self, positions: torch.Tensor, on_host: list[int] | None = None,
                   rows: list[int] | None = None, pool: State | None = None) -> RowsStep:
        """One token for each of n conversations at device positions [n] (also `on_host` in an eager step,
        with its `pool`), in the pool rows `rows` (some of the pool's, host-side) or in all of them (None)."""
        window, n, device = self.config.window, positions.shape[0], positions.device
        angles = positions.float()[:, None] * self._inv_freq()
        native = None
        if on_host is not None and device.type == "cpu" and self.dtype in DTYPES:
            native = step_ops()
            # The native operations update the state in place and refuse tensors they cannot read; checked
            # here, before any layer runs, a step never stops half applied.
            if native is not None and (pool is None or not _native_layout(pool, self.dtype)):
                native = None
        mask = host_rows = filled = key_masks = padding = filled_rows = None
        if on_host is None:  # a graph's step: whole ring buffers under a mask
            written = torch.arange(window, device=device) < positions[:, None]
            mask = torch.cat([written, torch.ones(n, 1, dtype=torch.bool, device=device)], dim=1)
        else:
            host_rows = list(range(n)) if rows is None else rows
            filled = [min(p, window) for p in on_host]
        if native is not None:  # it reads each row's filled slots itself
            filled_rows = torch.tensor(filled, device=device)
        elif on_host is not None:
            keys = torch.arange(-(-window // KEY_BLOCK) * KEY_BLOCK, device=device)
            key_masks = [None if f == window else keys[:-(-(f + 1) // KEY_BLOCK) * KEY_BLOCK] <= f
                         for f in filled]  # f + 1 real keys; a full window's number never changes
            padding = torch.zeros(KEY_BLOCK - 1, self.config.num_kv_heads, self.config.head_dim, dtype=self.dtype,
                                  device=device)
        pool_rows = torch.arange(n, device=device) if rows is None else torch.tensor(rows, device=device)
        return RowsStep(angles.cos().to(self.dtype), angles.sin().to(self.dtype), mask, positions % window,
                        pool_rows, rows is not None, host_rows, filled, key_masks, padding, native, filled_rows)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, state: State, all_logits: bool = False) -> torch.Tensor:
        """Run tokens [T] through the network from `state` (updated in place).

        Returns float32 logits for the last token [vocab], or for every token [T, vocab] if all_logits.
        """
        x = self._layers(tokens.to(self.device)[None], state, self._chunk(state.pos, tokens.shape[0]))[0]
        state.pos += tokens.shape[0]
        return self._logits(x if all_logits else x[-1])

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, states: list[State], pool: State | None = None,
               rows: list[int] | None = None) -> torch.Tensor:
        """One decode step for several conversations: tokens [n], the next token of each of `states` (updated
        in place, each at its own position). Returns float32 logits [n, vocab].

        Where the states are rows `rows` of `pool` (an engine's), the step works on the pool: on consecutive
        rows in place, on others through their index; else on the states stacked into a pool of their own
        (copied there and back). On the CPU a row's logits do not depend on the other rows (up to 16 rows in
        float32, 64 in int8: see `quant.row_by_row` and `quant.int8_matmul`), so a conversation decodes to
        the same tokens alone or beside others."""
        if len(states) != tokens.shape[0] or not states:
            raise ValueError("decode takes one token per state")
        if len(states) == 1 and states[0].pos == 0:  # the first token starts the document: a chunk's work
            return self.forward(tokens, states[0])[None]
        if any(s.pos == 0 for s in states):
            raise ValueError("decode continues conversations: prefill their first tokens")
        stacked = pool is None and len(states) > 1
        if pool is None:
            pool, rows = State.stack(states), None
        elif rows == list(range(rows[0], rows[0] + len(rows))):
            pool, rows = pool.rows(rows[0], rows[0] + len(rows)), None
        on_host = [s.pos for s in states]
        step = self._rows_step(torch.tensor(on_host, device=self.device), on_host, rows, pool)
        logits = self._logits(self._layers(tokens.to(self.device)[:, None], pool, step)[:, -1], step.native)
        for i, state in enumerate(states):
            if stacked:
                for dst, src in zip(state.tensors(), pool.row(i).tensors(), strict=True):
                    dst.copy_(src)
            state.pos += 1
        return logits

    @torch.no_grad()  # not inference_mode: torch.compile cannot trace in-place updates of the state under it
    def decode_rows(self, tokens: torch.Tensor, positions: torch.Tensor, pool: State) -> torch.Tensor:
        """One decode step for the n conversations whose states are the rows of `pool` (tensors [n, ...],
        updated in place), with their tokens and positions [n] as device tensors, and shapes that do not
        depend on the positions: what a CUDA graph captures (after torch.compile). Returns float32 logits
        [n, vocab]; the caller advances the positions."""
        return self._logits(self._layers(tokens[:, None], pool, self._rows_step(positions))[:, -1])

    def _layers(self, tokens: torch.Tensor, state: State, step: Step) -> torch.Tensor:
        """tokens [n, T] -> the final hidden states [n, T, width]: one conversation's chunk (n = 1, `state`
        its State), or one token for each row of a pool (`state`)."""
        x = self.embed_tokens.lookup(tokens)
        x = x * self.embed_scale  # exact: the scale is a bfloat16 value
        for layer, layer_state in zip(self.layers, state.layers, strict=True):
            x = layer(x, layer_state, step)
        return x

    def _logits(self, x: torch.Tensor, native: StepOps | None = None) -> torch.Tensor:
        logits = self.embed_tokens.logits(self.final_norm(x, native)).float()  # a new tensor: safe to update
        # cap * tanh(logits / cap), as cap * (2 sigmoid(2 logits / cap) - 1): torch's CPU tanh is several times
        # slower than its sigmoid. In place: no more vocabulary-sized tensors a step.
        cap = self.config.logit_cap
        if native is not None:
            return native.soft_cap_(logits, cap)
        return logits.mul_(2 / cap).sigmoid_().mul_(2 * cap).sub_(cap)

    @property
    def prefill_chunk(self) -> int:
        return PREFILL_CHUNK.get(self.device.type, PREFILL_CHUNK_ACCELERATOR)

    def prefill(self, tokens: torch.Tensor, state: State, chunk_size: int | None = None) -> torch.Tensor:
        """Feed a prompt of any length in chunks, continuing from `state`; returns the last token's logits."""
        if tokens.numel() == 0:
            raise ValueError("prefill needs at least one token")
        chunk_size = chunk_size or self.prefill_chunk
        for i in range(0, tokens.shape[0], chunk_size):
            logits = self.forward(tokens[i:i + chunk_size], state)
        return logits

    def step(self, token: int | torch.Tensor, state: State) -> torch.Tensor:
        """Decode one token of one conversation; returns its logits [vocab]. (The engine, rgchat/engine.py,
        decodes many at once, and on CUDA replays a captured graph.)"""
        return self.decode(torch.as_tensor(token).reshape(1), [state])[0]

    def weight_bytes(self) -> int:
        """Bytes of weights one decoded token reads: every matrix once (the tied embedding for the logits),
        in the form the kernels read it (for int4 on CPU, torch's repacked copy)."""
        from rgchat.quant import runtime_tensors

        return sum(t.numel() * t.element_size() for t in runtime_tensors(self))


# Projections that read the same input, by block: fuse_projections_ joins each group into one matrix.
FUSED_PROJECTIONS = {
    MLP: {"gate_up_proj": ("gate_proj", "up_proj")},
    RecurrentBlock: {"linear_yx": ("linear_y", "linear_x")},
    AttentionBlock: {"qkv_proj": ("q_proj", "k_proj", "v_proj")},
}


def fuse_projections_(model: Griffin) -> Griffin:
    """Join the projections that share an input into one matrix each (their separate copies are freed).

    On CUDA a decode step then launches a third fewer matrix-vector products, each longer and so nearer the
    memory bandwidth. On the CPU loaders call it only where int8 weights are packed (`ready_for_device_`):
    elsewhere the weights are pages of the mmap'd model file, and a joined copy would double the resident
    memory of those matrices."""
    for module in model.modules():
        for fused_name, names in FUSED_PROJECTIONS.get(type(module), {}).items():
            fused = fuse_linears([getattr(module, name) for name in names])
            if fused is not None:
                setattr(module, fused_name, fused)
                for name in names:
                    setattr(module, name, None)
    return model


def ready_for_device_(model: Griffin, packed: dict[str, torch.Tensor] | None = None) -> Griffin:
    """The last loading step, shared by model files and the bench's random models: quantized weights readied
    for their device (`prepare_model_`, with int4's cached CPU packing if given), and off the CPU the
    projections joined (`fuse_projections_`), and on the CPU too where int8 weights are packed into copies
    (joining them then costs no memory: they are packed straight into the joined matrices)."""
    if model.device.type != "cpu" or packs_int8_weights(model):
        fuse_projections_(model)
    return prepare_model_(model, packed)
