"""Fake quantization for quantization-aware training: weights per-channel symmetric (int8, 7-bit, 4-bit or
ternary), activations per-tensor asymmetric uint8 on the input of every Linear, straight-through estimator.

    qmodel = insert_fake_quant(student, QuantSpec())     # every Linear the adapter knows -> QuantLinear
    calibrate(qmodel, batches)                           # min-max observers fix the activation ranges
    ... train ...                                        # weights re-quantized every step (STE)
    with export_mode(qmodel): torch.onnx.export(...)     # plain Q/DQ (LSQ scales as constants)

The forward pass uses `torch.fake_quantize_per_channel_affine` / `fake_quantize_per_tensor_affine`: their
gradient is the straight-through estimator (1 inside the range, 0 outside) and the dynamo exporter maps them to
QuantizeLinear/DequantizeLinear. With LSQ (Esser et al. 2020) the activation scale is a parameter trained
through `torch._fake_quantize_learnable_per_tensor_affine` (LSQ's gradient); it has no ONNX op, so
`export_mode` switches every module to the plain op with the learned scale.

Every range is one ONNX can hold: activations (0, 255), or (0, 127) with `reduce_range`; weights are stored as
int8 (-128, 127) whatever their grid (7-bit, 4-bit, ternary values are a subset of the int8 values at the same
scale), so the exported weight Q/DQ always uses (-128, 127)."""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from compress.errors import InputError

# weight bits -> largest integer magnitude of the symmetric grid (ternary: {-1, 0, 1})
WEIGHT_LEVELS = {8: 127, 7: 63, 4: 7, 2: 1}
ACTIVATION_BITS = (8,)


@dataclass(frozen=True)
class QuantSpec:
    """How a model is fake-quantized (the qat pass's config holds these fields)."""

    weight_bits: int = 8  # 8, 7 (reduce range), 4 or 2 (ternary)
    activation_bits: int = 8
    # 7-bit weights and activations in (0, 127): no u8s8 saturation without VNNI. None: on when the CPU that runs
    # ONNX Runtime here lacks VNNI (compress.onnx.cpu.int8_saturates), where 8-bit parity fails (cosine 0.988 on ViT)
    reduce_range: bool | None = None
    lsq: bool = False  # learnable activation scales (LSQ)
    quantize_activations: bool = True
    head: bool = True  # also the Linear layers outside the transformer layers (pooler, classifier)
    embeddings: bool = True  # embedding tables int8 per row (Gather of int8 rows, times the row's scale)
    attention_qk: bool = False  # also Q and K^T, the inputs of the attention scores' MatMul (uint8 per tensor)
    attention_probs: bool = False  # also the attention probabilities and V, the inputs of the P x V MatMul

    def __post_init__(self) -> None:
        if self.reduce_range is None:
            from compress.onnx.cpu import resolve_reduce_range

            object.__setattr__(self, "reduce_range", resolve_reduce_range(None))

    @property
    def attention(self) -> bool:
        return self.attention_qk or self.attention_probs

    def check(self, where: str = "qat") -> None:
        """InputError (exit 2) for a bit width the ONNX export cannot hold."""
        if self.weight_bits not in WEIGHT_LEVELS:
            raise InputError(f"{where}.weight_bits: {self.weight_bits} cannot be exported (int8 Q/DQ holds 8, 7, 4 "
                             "or 2 = ternary weight bits); use one of those")
        if self.activation_bits not in ACTIVATION_BITS:
            raise InputError(f"{where}.activation_bits: {self.activation_bits} cannot be exported (ONNX Runtime's "
                             "QDQ activations are 8-bit: (0, 255) or (0, 127)); use 8")

    @property
    def weight_qmax(self) -> int:
        return min(WEIGHT_LEVELS[self.weight_bits], 63 if self.reduce_range else 127)

    @property
    def act_qmax(self) -> int:
        return 127 if self.reduce_range else 255


def weight_scale(w: Tensor, qmax: int) -> Tensor:
    """Per-output-channel symmetric scale of a `[out, in]` weight: max |w| of the row over `qmax` (ternary: the
    mean |w| of the row, TWN's threshold rule, so that small weights become 0)."""
    if qmax == 1:
        s = w.detach().abs().mean(dim=1)
    else:
        s = w.detach().abs().amax(dim=1) / qmax
    return s.clamp_min(1e-8).float()


def fake_quant_weight(w: Tensor, qmax: int) -> Tensor:
    """Symmetric per-channel fake quantization of `w` on the grid [-qmax, qmax] (STE gradient), zero point 0.
    The op's range is (-128, 127), the int8 container the export uses; the grid limit comes from the scale
    (max |w| = qmax * scale) except for ternary, whose scale comes from the mean and needs the clamp."""
    scale = weight_scale(w, qmax)
    zp = torch.zeros(w.shape[0], dtype=torch.int32, device=w.device)
    if qmax == 1:  # ternary: clip to [-s, s] first (straight through), so that round(w / s) is in {-1, 0, 1}
        lim = scale[:, None].to(w.dtype)
        w = w + (torch.maximum(torch.minimum(w, lim), -lim) - w).detach()
    return torch.fake_quantize_per_channel_affine(w, scale, zp, 0, -128, 127)


class ActQuant(nn.Module):
    """Per-tensor asymmetric activation fake quantization with a min-max observer.

    While `observing`, forward records the running min and max of its input and returns it unchanged; `freeze`
    turns the range into a scale and zero point (the range always holds 0, so 0 is exact). With `lsq` the scale is
    a trained parameter (LSQ), else a buffer."""

    def __init__(self, qmax: int = 255, lsq: bool = False):
        super().__init__()
        self.qmax = qmax
        self.lsq = lsq
        self.register_buffer("lo", torch.tensor(float("inf")))
        self.register_buffer("hi", torch.tensor(float("-inf")))
        self.register_buffer("zero_point", torch.tensor(0, dtype=torch.int32))
        if lsq:
            self.scale = nn.Parameter(torch.tensor(1.0))
        else:
            self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("calibrated", torch.tensor(False))
        self.observing = False
        self.ready = False  # calibrated (a Python flag: torch.export cannot branch on a buffer)
        self.exported: tuple[float, int] | None = None  # (scale, zero point) as constants while exporting

    def observe(self, x: Tensor) -> None:
        x = x.detach()
        self.lo = torch.minimum(self.lo, x.min().float())
        self.hi = torch.maximum(self.hi, x.max().float())

    def freeze(self) -> None:
        """Scale and zero point from the observed range (widened to hold 0)."""
        if not torch.isfinite(self.lo) or not torch.isfinite(self.hi):
            raise InputError("qat: an activation observer saw no data; data.calibration gave no batch")
        lo, hi = min(float(self.lo), 0.0), max(float(self.hi), 0.0)
        scale = max((hi - lo) / self.qmax, 1e-8)
        zp = int(round(-lo / scale))
        with torch.no_grad():
            self.scale.fill_(scale)
            self.zero_point.fill_(max(0, min(self.qmax, zp)))
            self.calibrated.fill_(True)
        self.ready = True

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args)
        self.ready = bool(self.calibrated)  # a resumed or reloaded model keeps its calibration

    def qparams(self) -> tuple[float, int]:
        """(scale, zero point) as plain numbers."""
        return float(self.scale.detach().abs().clamp_min(1e-8)), int(self.zero_point)

    def forward(self, x: Tensor) -> Tensor:
        if self.observing:
            self.observe(x)
            return x
        if not self.ready:
            return x
        if self.exported is not None:  # the ops the dynamo exporter maps to QuantizeLinear / DequantizeLinear
            scale, zp = self.exported
            q = torch.ops.quantized_decomposed.quantize_per_tensor(x, scale, zp, 0, self.qmax, torch.uint8)
            return torch.ops.quantized_decomposed.dequantize_per_tensor(q, scale, zp, 0, self.qmax, torch.uint8)
        if self.lsq:
            grad_factor = 1.0 / (x.numel() * self.qmax) ** 0.5  # LSQ's step-size gradient scale
            return torch._fake_quantize_learnable_per_tensor_affine(
                x, self.scale.reshape(1), self.zero_point.float().reshape(1), 0, self.qmax, grad_factor)
        scale, zp = self.qparams()
        return torch.fake_quantize_per_tensor_affine(x, scale, zp, 0, self.qmax)

    def extra_repr(self) -> str:
        return f"qmax={self.qmax}, lsq={self.lsq}"


class QuantLinear(nn.Module):
    """An `nn.Linear` whose input goes through `ActQuant` and whose weight is fake-quantized per output channel.
    The original Linear stays inside (`linear`), so its parameters keep their names under `.linear.`."""

    def __init__(self, linear: nn.Linear, spec: QuantSpec):
        super().__init__()
        self.linear = linear
        self.qmax = spec.weight_qmax
        self.act = ActQuant(spec.act_qmax, spec.lsq) if spec.quantize_activations else None
        self.exported: tuple[Tensor, Tensor] | None = None  # (int8 weight, scales) while exporting

    def int8_weight(self) -> tuple[Tensor, Tensor]:
        """The weight as the export stores it: int8 values `[out, in]` and one float scale per output channel
        (the same grid `fake_quant_weight` trains on)."""
        w = self.linear.weight.detach().float()
        scale = weight_scale(w, self.qmax)
        q = torch.clamp(torch.round(w / scale[:, None]), -self.qmax, self.qmax).to(torch.int8)
        return q, scale

    @property
    def weight(self) -> Tensor:  # the adapters read projection weights through `.weight`
        return self.linear.weight

    @property
    def bias(self) -> Tensor | None:
        return self.linear.bias

    def forward(self, x: Tensor) -> Tensor:
        if self.act is not None:
            x = self.act(x)
        if self.exported is not None:  # DequantizeLinear of an int8 initializer: no float weight in the graph
            q, scale = self.exported
            w = torch.ops.quantized_decomposed.dequantize_per_channel(
                q, scale, torch.zeros_like(scale, dtype=torch.int64), 0, -128, 127, torch.int8)
            return nn.functional.linear(x, w, self.linear.bias)
        return nn.functional.linear(x, fake_quant_weight(self.linear.weight, self.qmax), self.linear.bias)


ATTENTION_IMPL = "compress_qat"  # the attention function registered with transformers (see `quantized_attention`)


class AttentionQuant(nn.Module):
    """Activation fake quantization of one attention module's two activation x activation MatMuls: `q` and `k`
    on Q and K^T (the scores), `p` and `v` on the probabilities and V (the context). It is attached to the module
    that calls transformers' attention function (the owner of the q projection) as `qat_attention`, and read by
    `quantized_attention`."""

    def __init__(self, qmax: int, lsq: bool, qk: bool, probs: bool):
        super().__init__()
        self.q = ActQuant(qmax, lsq) if qk else None
        self.k = ActQuant(qmax, lsq) if qk else None
        self.p = ActQuant(qmax, lsq) if probs else None
        self.v = ActQuant(qmax, lsq) if probs else None
        self.previous_impl: str | None = None  # the model's attention implementation before QAT (restored by strip)


def quantized_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                        scaling: float | None = None, dropout: float = 0.0, **kwargs: Any) -> tuple[Tensor, Tensor]:
    """transformers' eager attention (scores, additive mask, softmax, dropout, context; GQA's kv heads repeated)
    with the fake quantization of `module.qat_attention` on the MatMul inputs. K is quantized after its transpose
    (per-tensor quantization commutes with it) so that each QuantizeLinear / DequantizeLinear pair feeds its MatMul
    directly. The probabilities returned (what the distillation's attention KL reads) are the float ones: the
    quantized ones hold exact zeros (every probability under half a step), whose log the KL cannot take."""
    aq = getattr(module, "qat_attention", None)
    groups = int(getattr(module, "num_key_value_groups", 1) or 1)
    if groups > 1:  # GQA: every query head reads its kv head
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    kt = key.transpose(2, 3)
    if aq is not None and aq.q is not None:
        query, kt = aq.q(query), aq.k(kt)
    scores = torch.matmul(query, kt) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    p_in = probs
    if aq is not None and aq.p is not None:
        p_in, value = aq.p(probs), aq.v(value)
    out = torch.matmul(p_in, value).transpose(1, 2).contiguous()
    return out, probs


def _register_attention() -> None:
    """Register `quantized_attention` (and the eager additive mask for it) with transformers, once."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from compress.models.base import PROBS_ATTENTION

    if ATTENTION_IMPL not in ALL_ATTENTION_FUNCTIONS._global_mapping:
        ALL_ATTENTION_FUNCTIONS.register(ATTENTION_IMPL, quantized_attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_IMPL, eager_mask)
    PROBS_ATTENTION.add(ATTENTION_IMPL)  # it returns the probabilities: the adapter's capture keeps it


def insert_attention_quant(model: nn.Module, spec: QuantSpec) -> list[str]:
    """Attach an `AttentionQuant` to the attention module of every layer the adapter knows (the module holding the
    q projection, which is what transformers passes to its attention function) and switch the model to
    `quantized_attention`. Returns the names of the modules it was attached to."""
    from compress.models import get_adapter
    from compress.models.base import _set_attn_implementation

    _register_attention()
    ad = get_adapter(model)
    parent = {id(c): (name, m) for name, m in model.named_modules() for c in m.children()}
    names = []
    for lv in ad.layers:
        if lv.attention.fused_qkv:
            raise InputError("qat.quantize_qk / quantize_attention_probs: fused q/k/v projections (GPT-2) are not "
                             "supported; turn them off")
        name, owner = parent[id(lv.attention.q)]
        owner.qat_attention = AttentionQuant(spec.act_qmax, spec.lsq, spec.attention_qk, spec.attention_probs)
        names.append(f"{name}.qat_attention")
    previous = getattr(getattr(model, "config", None), "_attn_implementation", None)
    _set_attn_implementation(model, ATTENTION_IMPL)
    for m in model.modules():
        if isinstance(m, AttentionQuant):
            m.previous_impl = previous
    return names


class QuantEmbedding(nn.Module):
    """An `nn.Embedding` whose table is fake-quantized symmetric int8 per row (per token). Exported as a Gather
    of the int8 table and a Mul by the gathered row scales: the file holds int8 rows, and ORT dequantizes only
    the rows it reads (a DequantizeLinear of the whole table would run over every row on every call)."""

    def __init__(self, emb: nn.Embedding):
        super().__init__()
        self.emb = emb
        self.exported: tuple[Tensor, Tensor] | None = None

    @property
    def weight(self) -> Tensor:
        return self.emb.weight

    def int8_table(self) -> tuple[Tensor, Tensor]:
        w = self.emb.weight.detach().float()
        scale = weight_scale(w, 127)
        return torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8), scale

    def forward(self, ids: Tensor) -> Tensor:
        if self.exported is not None:
            q, scale = self.exported
            # embedding lookups (ONNX Gather), not tensor indexing (GatherND, which mobile EPs do not take)
            return nn.functional.embedding(ids, q).to(torch.float32) * nn.functional.embedding(ids, scale[:, None])
        return nn.functional.embedding(ids, fake_quant_weight(self.emb.weight, 127), self.emb.padding_idx)


def quantizable_linears(model: nn.Module, head: bool = False) -> dict[str, nn.Linear]:
    """The Linear layers of `model` that the model adapter knows (q, k, v, o, FFN up/gate/down of every layer),
    by their qualified name, and with `head` every other nn.Linear of the model (pooler, classifier). InputError
    when the adapter finds no layer Linear (or the model is not a known family)."""
    from compress.models import get_adapter

    try:
        ad = get_adapter(model)
        layers = ad.layers
    except InputError as exc:
        raise InputError(f"qat: no Linear layers to quantize: {exc}") from exc
    wanted: dict[int, nn.Module] = {}
    for lv in layers:
        for m in (lv.attention.q, lv.attention.k, lv.attention.v, lv.attention.o, lv.ffn.up, lv.ffn.down, lv.ffn.gate):
            if isinstance(m, nn.Linear):
                wanted[id(m)] = m
    found = {name: m for name, m in model.named_modules() if id(m) in wanted}
    if not found:
        raise InputError(f"qat: {type(model).__name__} has no nn.Linear projection the model adapter knows "
                         "(GPT-2's Conv1D is not supported); QAT has nothing to quantize")
    if head:
        found.update({name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and name not in found})
    return found


def insert_fake_quant(model: nn.Module, spec: QuantSpec) -> list[str]:
    """Replace every adapter-known Linear of `model` (in place) by a `QuantLinear`; returns their names."""
    spec.check()
    names = list(quantizable_linears(model, head=spec.head))
    attention = insert_attention_quant(model, spec) if spec.attention else []  # finds owners by the plain q's identity
    for name in names:
        _swap(model, name, QuantLinear(getattr_path(model, name), spec))
    names += attention
    if spec.embeddings:
        from compress.models import get_adapter

        emb_root = get_adapter(model).embeddings
        for name, m in model.named_modules():
            if isinstance(m, nn.Embedding) and any(m is e for e in emb_root.modules()):
                _swap(model, name, QuantEmbedding(m))
                names.append(name)
    return names


def getattr_path(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def quant_modules(model: nn.Module) -> Iterator[tuple[str, QuantLinear]]:
    return ((n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear))


def act_quants(model: nn.Module) -> list[ActQuant]:
    return [m for m in model.modules() if isinstance(m, ActQuant)]


def lsq_scales(model: nn.Module) -> list[nn.Parameter]:
    """The learnable activation scales (LSQ), for the trainer's own parameter group."""
    return [m.scale for m in act_quants(model) if isinstance(m.scale, nn.Parameter)]


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[dict[str, Tensor]]) -> int:
    """Run `batches` through `model` with every activation observer recording min/max, then fix the ranges.
    Returns the number of batches seen; InputError when there were none."""
    quants = act_quants(model)
    if not quants:
        return 0
    was_training = model.training
    model.eval()
    for q in quants:
        q.observing = True
    n = 0
    try:
        for batch in batches:
            model(**batch)
            n += 1
    finally:
        for q in quants:
            q.observing = False
        model.train(was_training)
    if n == 0:
        raise InputError("qat: the activation observers need calibration batches; data.calibration (or data.train) is empty")
    for q in quants:
        q.freeze()
    return n


@contextmanager
def export_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model computes what its ONNX graph will: every activation goes through quantize /
    dequantize with its scale and zero point as constants (LSQ: the learned scale) and every weight is an int8
    tensor dequantized per channel, through the `quantized_decomposed` ops the dynamo exporter maps to
    QuantizeLinear / DequantizeLinear. The result equals the fake-quant forward pass."""
    from torch.ao.quantization.fx import _decomposed  # noqa: F401 - registers torch.ops.quantized_decomposed

    quants = act_quants(model)
    linears = [m for _, m in quant_modules(model)]
    tables = [m for m in model.modules() if isinstance(m, QuantEmbedding)]
    for q in quants:
        q.exported = q.qparams()
    for m in linears:
        m.exported = m.int8_weight()
    for e in tables:
        e.exported = e.int8_table()
    try:
        yield model
    finally:
        for q in quants:
            q.exported = None
        for m in [*linears, *tables]:
            m.exported = None


def strip_fake_quant(model: nn.Module) -> nn.Module:
    """Put the plain Linear layers back (in place): the float model with the QAT-trained weights."""
    previous: list[str | None] = []
    for m in list(model.modules()):
        aq = getattr(m, "qat_attention", None)
        if isinstance(aq, AttentionQuant):
            previous.append(aq.previous_impl)
            del m.qat_attention
    if previous and getattr(model, "config", None) is not None:
        from compress.models.base import _set_attn_implementation

        _set_attn_implementation(model, previous[0] or "eager")
    for name, m in list(model.named_modules()):
        if isinstance(m, QuantLinear):
            _swap(model, name, m.linear)
        elif isinstance(m, QuantEmbedding):
            _swap(model, name, m.emb)
    return model


def quant_state(model: nn.Module) -> dict[str, Any]:
    """Activation scales and zero points by module name (saved next to the student)."""
    out: dict[str, Any] = {}
    for name, m in quant_modules(model):
        if m.act is not None:
            out[name] = {"scale": m.act.qparams()[0], "zero_point": m.act.qparams()[1],
                         "qmax": m.act.qmax}
    for name, m in model.named_modules():
        if isinstance(m, AttentionQuant):
            for part in ("q", "k", "p", "v"):
                aq = getattr(m, part)
                if aq is not None:
                    out[f"{name}.{part}"] = {"scale": aq.qparams()[0], "zero_point": aq.qparams()[1], "qmax": aq.qmax}
    return out
