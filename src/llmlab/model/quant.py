"""4-bit weight copies for fast CPU decoding: groups of 32 weights share a scale and a minimum, as in GGUF's Q4_1.

Decoding one token reads every weight once, so its speed is the speed of streaming the weights. PyTorch's
CPU kernel for grouped 4-bit weights (`_weight_int4pack_mm_for_cpu`, bf16 activations) does that about 4×
faster than its bf16 matrix-vector product, but it is slower than a dense matmul once a call has more than a
few rows. So quantizing keeps the dense weights for prefill and training, and adds a packed 4-bit copy that
calls of at most `INT4_MAX_ROWS` rows use (decode steps of small batches).

The transformer knows nothing of this: quantize_int4 swaps in, from outside, modules that hold both. Single
projections become an `Int4Linear`; attention and SwiGLU blocks become `Int4Attention` / `Int4SwiGLU`,
the same modules (same parameters, same names) whose q/k/v and gate/up projections run as one 4-bit call.

Q4_1 stores w = d·q + m with q in 0..15; the kernel computes (q − 8)·scale + zero. With scale = d and
zero = m + 8d the two are the same, so a Q4_1 GGUF (SmolLM2's) is re-packed exactly, up to bf16 scales:
quantizing a group with min/max finds the same q, d and m back.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from llmlab.errors import LLMLabError
from llmlab.model.lora import lora_layers
from llmlab.model.transformer import MLP, Attention, Linear

INT4_MAX_ROWS = 4  # measured: at 8 rows the dense bf16 matmul is already faster than the 4-bit kernel


class Int4Matmul(nn.Module):
    """y = x @ W.T + b for W = one or more Linear weights side by side, stored as 4-bit groups.

    Several projections that read the same input (q, k and v; gate and up) become one call, which halves
    the per-call overhead that dominates matrices this small; forward returns one output per projection.
    With bits=8 each weight is u = 16·hi + lo (u in 0..255) and the product is the sum of two 4-bit
    products, one per half: twice the work, but as close to the weights as bf16 (for the output head,
    where 4 bits change too many predictions).
    """

    def __init__(self, linears: list[nn.Linear], group_size: int = 32, bits: int = 4):
        super().__init__()
        weight = torch.cat([lin.weight.detach().float() for lin in linears])
        out_features, in_features = weight.shape
        if in_features % group_size or out_features % 16:  # the kernel packs 16 output rows at a time
            raise LLMLabError(f"a {out_features}x{in_features} weight cannot be packed in 4-bit groups of "
                              f"{group_size}: widths must be multiples of {group_size} (inputs) and 16 (outputs)")
        groups = weight.reshape(out_features, in_features // group_size, group_size)
        levels = 2**bits - 1
        if bits == 4:  # minimum and scale per group (Q4_1)
            low = groups.amin(-1)
            step = ((groups.amax(-1) - low) / levels).clamp_min(1e-12)
        else:  # symmetric (Q8_0): w = step·(u − 128), so the large zero term below is exactly 0 in bf16
            step = (groups.abs().amax(-1) / 127).clamp_min(1e-12)
            low = -128 * step
        u = ((groups - low[..., None]) / step[..., None]).round().clamp(0, levels).to(torch.int32)
        u = u.reshape(out_features, in_features)
        # w = low + step·u; each 4-bit half h with weight f (16 or 1) contributes f·step·(h − 8) + 8·f·step,
        # and the kernel computes (h − 8)·scale + zero per group: so scale = f·step, and low goes to one zero
        halves = [(u, 1)] if bits == 4 else [(u >> 4, 16), (u & 15, 1)]
        for i, (h, f) in enumerate(halves):
            zero = 8 * f * step + (low if i == 0 else 0)
            scales_and_zeros = torch.stack([f * step, zero], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
            # buffers, so .to(device) moves them; not persistent, so checkpoints keep only the dense weights
            self.register_buffer(f"packed{i}", torch.ops.aten._convert_weight_to_int4pack_for_cpu(h, 1),
                                 persistent=False)
            self.register_buffer(f"scales_and_zeros{i}", scales_and_zeros, persistent=False)
        self.n_planes = len(halves)
        biases = [lin.bias for lin in linears]
        bias = torch.cat([b.detach() for b in biases]).float() if biases[0] is not None else None
        self.register_buffer("bias", bias, persistent=False)
        self.group_size, self.in_features = group_size, in_features
        self.splits = [lin.out_features for lin in linears]

    def forward(self, x) -> tuple[torch.Tensor, ...]:
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16)
        y = None
        for i in range(self.n_planes):
            part = torch.ops.aten._weight_int4pack_mm_for_cpu(
                rows, getattr(self, f"packed{i}"), self.group_size, getattr(self, f"scales_and_zeros{i}"))
            y = part.float() if y is None else y + part.float()
        if self.bias is not None:
            y = y + self.bias
        y = y.to(x.dtype).view(*x.shape[:-1], -1)
        return y.split(self.splits, dim=-1)


def pack_groups(weight: torch.Tensor, bits: int = 4, group_size: int = 32):
    """(q, d, m) as uint8, fp16, fp16 with w ≈ d·q + m per group of 32 inputs: the layout of the native decode
    kernel (llmlab.engine.native).

    4 bits: Q4_1's minimum and step per group, two per byte as GGUF packs them (byte j of a group holds q[j]
    and q[j + 16] << 4), so a Q4_1 GGUF's weights come back exactly (min/max finds the same q, d and m, and
    GGUF's scales are fp16 too). 8 bits: symmetric like Q8_0 (d = absmax / 127, q = round(w / d) + 128,
    m = −128·d), so a Q8_0 tensor's weights come back exactly too.
    """
    if group_size != 32:
        raise LLMLabError(f"groups of {group_size}: only groups of 32 are packed")
    w = weight.detach().float()
    out_features, in_features = w.shape
    if in_features % group_size:
        raise LLMLabError(f"a {out_features}x{in_features} weight cannot be packed in groups of {group_size}: "
                          f"its input width must be a multiple of {group_size}")
    groups = w.reshape(out_features, in_features // group_size, group_size)
    if bits == 4:
        low = groups.amin(-1).half()
        d = ((groups.amax(-1) - low.float()) / 15).half()
        # q from the fp16 scale and minimum the kernel will use, not from their fp32 values
        q = ((groups - low.float()[..., None]) / d.float().clamp_min(1e-30)[..., None]).round().clamp(0, 15)
        q = q.to(torch.uint8)
        q = q[..., :16] | (q[..., 16:] << 4)
        return q.reshape(out_features, in_features // 2).contiguous(), d.contiguous(), low.contiguous()
    if bits == 8:
        d = (groups.abs().amax(-1) / 127).half()
        q = (groups / d.float().clamp_min(1e-30)[..., None]).round().clamp(-128, 127) + 128
        return q.to(torch.uint8).reshape(out_features, in_features).contiguous(), d.contiguous(), (-128 * d).contiguous()
    raise LLMLabError(f"{bits}-bit groups: only 4 and 8 bits are packed")


def unpack_groups(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """The fp32 weight (out, in) that pack_groups' (q, d, m) stand for."""
    if bits == 4:
        q = torch.stack([q.view(q.shape[0], -1, 16) & 15, q.view(q.shape[0], -1, 16) >> 4], 2)
    q = q.reshape(d.shape[0], d.shape[1], 32).float()
    return (q * d.float()[..., None] + m.float()[..., None]).reshape(d.shape[0], -1)


def use_int4(x: torch.Tensor) -> bool:
    """Whether a call with input x takes the 4-bit path: few rows, on the CPU."""
    return x.device.type == "cpu" and x.numel() <= INT4_MAX_ROWS * x.shape[-1]


class Int4Linear(Linear):
    """A Linear plus a 4-bit copy of its weight, which calls of few rows use.

    The weight and bias are the very Parameters of the Linear it replaces: a tied head stays tied, and
    training, prefill and checkpoints see the same dense layer under the same names.
    """

    def __init__(self, linear: nn.Linear, group_size: int = 32, bits: int = 4):
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        # a packed projection (llmlab.engine.native) reads its weight as a plain tensor: make it a Parameter
        as_param = lambda t: t if t is None or isinstance(t, nn.Parameter) else nn.Parameter(t, requires_grad=False)  # noqa: E731
        self.weight, self.bias = as_param(linear.weight), as_param(linear.bias)
        self.int4 = Int4Matmul([linear], group_size, bits)

    def forward(self, x):
        return self.int4(x)[0] if use_int4(x) else super().forward(x)


class Int4Attention(Attention):
    """Attention whose q, k and v projections of few rows are one 4-bit call (qkv_int4)."""

    def project_qkv(self, x):
        return self.qkv_int4(x) if use_int4(x) else super().project_qkv(x)


class Int4SwiGLU(MLP):
    """A SwiGLU MLP whose gate and up projections of few rows are one 4-bit call (gate_up_int4)."""

    def project_gate_up(self, x):
        return self.gate_up_int4(x) if use_int4(x) else super().project_gate_up(x)


def quantize_int4(model, group_size: int = 32):
    """Give every attention block and MLP of a dense model its 4-bit copies, and the output head an 8-bit one."""
    if model.model.embed_tokens.weight.device.type != "cpu":
        raise LLMLabError("4-bit decoding uses a CPU kernel; the model is not on the CPU")
    if lora_layers(model):
        raise LLMLabError("this model has LoRA adapters: merge them first (llmlab merge) to decode in 4 bits")
    for module in list(model.modules()):
        # fusing projections that read the same input halves the per-call overhead that dominates matrices
        # this small; the module keeps its identity, parameters and names and only gains the fused copy
        if type(module) is Attention:
            module.qkv_int4 = Int4Matmul([module.q_proj, module.k_proj, module.v_proj], group_size)
            module.__class__ = Int4Attention
            module.o_proj = Int4Linear(module.o_proj, group_size)
        elif type(module) is MLP:
            if module.swiglu:
                module.gate_up_int4 = Int4Matmul([module.gate_proj, module.up_proj], group_size)
                module.__class__ = Int4SwiGLU
            else:
                module.up_proj = Int4Linear(module.up_proj, group_size)
            module.down_proj = Int4Linear(module.down_proj, group_size)
    if model.config.vocab_size % 16 == 0 and not isinstance(model.lm_head, Int4Linear):
        model.lm_head = Int4Linear(model.lm_head, group_size, bits=8)  # else dense (e.g. GPT-2's 50,257 tokens)
    return model
