"""One structural view over Hugging Face transformer families.

Pruning, architecture search, QAT and distillation reach a model only through `ModelAdapter` (built by
`compress.models.get_adapter`), so nothing outside `compress/models/` special-cases a family. A family is one
`FamilySpec` row in `compress/models/families.py`: where the layers, projections and norms live (dotted paths,
with candidates for older transformers layouts) and which config attributes hold its sizes.

Conventions
-----------
* Projection weights are read in the `[out_features, in_features]` layout whatever the module type:
  `proj_weight()` returns `weight` for `nn.Linear` and `weight.T` (a view) for GPT-2's `Conv1D`.
* Heads: `num_heads` query heads of `head_dim` each; `num_kv_heads` key/value heads (GQA: query head `h` reads
  kv head `h // (num_heads // num_kv_heads)`). Output rows `[h*head_dim, (h+1)*head_dim)` of a q/k/v projection
  belong to head `h`; the same columns of the o-projection's input do.
* GPT-2's `c_attn` is one fused `Conv1D` producing `[q | k | v]` along its output; `AttentionView.fused_qkv` is
  True and `q`, `k`, `v` are all that module. `AttentionView.qkv_slice(kind)` gives the output range of each part,
  `proj_weight(kind)` / `proj_bias(kind)` / `head_weight(kind, h)` return per-part / per-head views.

Config fields (`ModelAdapter.config_fields`), the attributes to rewrite after physical pruning
-----------------------------------------------------------------------------------------------
=================  =====================  ==========  ===================  =====================
logical name       BERT / RoBERTa / ViT   DistilBERT  GPT-2                LLaMA / Qwen2
=================  =====================  ==========  ===================  =====================
num_layers         num_hidden_layers      n_layers    n_layer              num_hidden_layers
num_heads          num_attention_heads    n_heads     n_head               num_attention_heads
num_kv_heads       num_attention_heads*   n_heads*    n_head*              num_key_value_heads
intermediate_size  intermediate_size      hidden_dim  n_inner (None=4*d)   intermediate_size
hidden_size        hidden_size            dim         n_embd               hidden_size
head_dim           None (= hidden/heads)  None        None                 head_dim (set it when
                                                                           heads change: Qwen2
                                                                           derives it otherwise)
vocab_size         vocab_size (ViT: None) vocab_size  vocab_size           vocab_size
=================  =====================  ==========  ===================  =====================
`*` multi-head families: kv heads are the query heads, one attribute for both. `head_dim` None means the family
derives it as hidden_size // num_heads, so removing heads there needs a per-layer mechanism, not a config edit.
The names come from optimum's `NormalizedConfigManager` where it knows them, resolved through the config's
`attribute_map` to the attribute actually stored; the family table fills in the rest.

Capture (`ModelAdapter.capture`)
--------------------------------
Forward hooks only; every hook is removed on exit, also when the body raises. Each forward of the model resets the
lists (the hook on layer 0's input does it), so a capture holds the most recent forward pass. Tensors keep their
autograd graph unless `detach=True`, so distillation losses can back-propagate through a student's captures.
* `hidden_states`: `num_layers + 1` tensors `[B, T, hidden]`, as HF's `output_hidden_states` (transformers >= 5):
  the input of layer 0 (embeddings output), the outputs of layers 1..L-1, and for the last entry the last layer's
  output after the final norm for GPT-2 (`ln_f`) and LLaMA/Qwen2 (`norm`), before it for ViT (HF does the same:
  ViT's `layernorm` output is only `last_hidden_state`). `layer_outputs` holds the raw outputs of all L layers
  and `final_hidden_state` the final norm's output where there is one.
* `attentions`: attention probabilities `[B, H, T, T]` per layer, the second output of each attention module.
  HF's sdpa/flash kernels return none, so inside the context the model is switched to eager attention (through
  `set_attn_implementation`) and switched back on exit. This reuses transformers' own masking and RoPE, which is
  more robust than recomputing softmax(QK^T) from captured projections.
* `attention_outputs`: the o-projection's output `[B, T, hidden]` per layer: the attention sub-layer's output
  before dropout, the residual and (post-norm families) the LayerNorm.
  A layer whose attention was pruned away (`compress.prune.units.EmptyAttention`) keeps None in both lists;
  the distillation objective leaves it out of the attention terms.
* `q`, `k`, `v`: projection outputs `[B, T, H*head_dim]` (k, v: `[B, T, KV*head_dim]`), before any reshape and
  before RoPE (LLaMA/Qwen2 rotate inside the attention function).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from compress.errors import CompressError, InputError

log = logging.getLogger(__name__)

QKV = Literal["q", "k", "v"]
# attention implementations that return the probabilities (the capture keeps them; others switch to eager);
# compress.quant.fake adds its quantized attention
PROBS_ATTENTION: set[str] = {"eager"}
LOGICAL_FIELDS = (
    "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "hidden_size", "head_dim", "vocab_size",
)
Paths = tuple[str, ...]


# ---------------------------------------------------------------------------------------------------- helpers


def is_conv1d(module: nn.Module) -> bool:
    """True for GPT-2 style `Conv1D` (weight stored `[in, out]`)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


def out_features(module: nn.Module) -> int:
    """Output width of an `nn.Linear` or `Conv1D`."""
    return int(module.weight.shape[1] if is_conv1d(module) else module.weight.shape[0])


def in_features(module: nn.Module) -> int:
    """Input width of an `nn.Linear` or `Conv1D`."""
    return int(module.weight.shape[0] if is_conv1d(module) else module.weight.shape[1])


def proj_weight(module: nn.Module) -> torch.Tensor:
    """The weight of an `nn.Linear` or `Conv1D` as `[out, in]` (a view: writes go to the parameter)."""
    return module.weight.T if is_conv1d(module) else module.weight


def get_path(root: nn.Module, path: str) -> Any:
    """`root.a.b.0.c` for path 'a.b.0.c' (integers index ModuleLists); AttributeError when missing."""
    obj: Any = root
    for part in path.split("."):
        if part.isdigit() and isinstance(obj, (nn.ModuleList, nn.Sequential, list, tuple)):
            obj = obj[int(part)]
        else:
            obj = getattr(obj, part)
    return obj


def first_path(root: nn.Module, candidates: Paths) -> tuple[str, Any] | None:
    """(path, object) of the first candidate path that exists under `root`, else None."""
    for path in candidates:
        try:
            obj = get_path(root, path)
        except (AttributeError, IndexError):
            continue
        if obj is not None:
            return path, obj
    return None


def _first_tensor(args: tuple, kwargs: dict, name: str) -> torch.Tensor | None:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    value = kwargs.get(name)
    return value if isinstance(value, torch.Tensor) else None


def _main_output(output: Any) -> Any:
    return output[0] if isinstance(output, (tuple, list)) else output


# ---------------------------------------------------------------------------------------------------- views


@dataclass
class AttentionView:
    """The attention block of one layer. `module` is the module whose output is `(attn_output, attn_probs)`."""

    module: nn.Module
    q: nn.Module
    k: nn.Module
    v: nn.Module
    o: nn.Module
    num_heads: int
    num_kv_heads: int
    head_dim: int
    fused_qkv: bool

    @property
    def kv_groups(self) -> int:
        """Query heads per kv head (1 for multi-head attention)."""
        return self.num_heads // self.num_kv_heads

    def kv_head_of(self, head: int) -> int:
        """The kv head query head `head` reads (GQA)."""
        return head // self.kv_groups

    def _heads(self, kind: QKV) -> int:
        return self.num_heads if kind == "q" else self.num_kv_heads

    def qkv_slice(self, kind: QKV) -> slice:
        """Range of the projection's output features holding `kind` (the whole output unless fused)."""
        if not self.fused_qkv:
            return slice(0, self._heads(kind) * self.head_dim)
        q_w, kv_w = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        start = {"q": 0, "k": q_w, "v": q_w + kv_w}[kind]
        return slice(start, start + (q_w if kind == "q" else kv_w))

    def head_slice(self, kind: QKV, head: int) -> slice:
        """Output features of `kind`'s projection belonging to `head` (offset into the fused output if fused)."""
        if not 0 <= head < self._heads(kind):
            raise IndexError(f"{kind} head {head} out of range 0..{self._heads(kind) - 1}")
        base = self.qkv_slice(kind).start
        return slice(base + head * self.head_dim, base + (head + 1) * self.head_dim)

    def proj_module(self, kind: Literal["q", "k", "v", "o"]) -> nn.Module:
        return {"q": self.q, "k": self.k, "v": self.v, "o": self.o}[kind]

    def proj_weight(self, kind: Literal["q", "k", "v", "o"]) -> torch.Tensor:
        """`[out, in]` weight of q, k, v (its part of a fused projection) or o; views of the parameters."""
        w = proj_weight(self.proj_module(kind))
        return w if kind == "o" else w[self.qkv_slice(kind)]

    def proj_bias(self, kind: Literal["q", "k", "v", "o"]) -> torch.Tensor | None:
        b = getattr(self.proj_module(kind), "bias", None)
        if b is None or kind == "o":
            return b
        return b[self.qkv_slice(kind)]

    def head_weight(self, kind: QKV, head: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(`[head_dim, hidden]` weight, `[head_dim]` bias or None) of one head of q, k or v."""
        sl = self.head_slice(kind, head)
        module = self.proj_module(kind)
        b = getattr(module, "bias", None)
        return proj_weight(module)[sl], (None if b is None else b[sl])

    def o_head_columns(self, head: int) -> slice:
        """Input features of the o-projection fed by query head `head`."""
        return slice(head * self.head_dim, (head + 1) * self.head_dim)

    def split_qkv(self, fused_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Split a fused projection output `[..., q|k|v]` into its three parts."""
        return tuple(fused_output[..., self.qkv_slice(kind)] for kind in ("q", "k", "v"))  # type: ignore[return-value]


@dataclass
class FFNView:
    """The feed-forward block of one layer. `module` is the FFN container (for BERT-style layers, which split
    the FFN over `intermediate` and `output`, the module holding `up`). `gate` is None unless gated (SwiGLU)."""

    module: nn.Module
    up: nn.Module
    down: nn.Module
    gate: nn.Module | None
    intermediate_size: int
    act: nn.Module | None


@dataclass
class LayerView:
    """One transformer layer. `attn_norm` / `ffn_norm` are the norms of the attention and FFN sub-layers: applied
    before them for `norm_position == 'pre'` (ViT, GPT-2, LLaMA, Qwen2), after the residual sum for 'post'
    (BERT, RoBERTa, DistilBERT)."""

    index: int
    module: nn.Module
    attention: AttentionView
    ffn: FFNView
    attn_norm: nn.Module
    ffn_norm: nn.Module
    norm_position: Literal["pre", "post"] = "pre"


@dataclass(frozen=True)
class FamilySpec:
    """Where a family keeps its parts. Each path field is a tuple of candidate dotted paths (the first one that
    exists wins), relative to the base model (`layers`, `embeddings`, `final_norm`) or to one layer (the rest).
    `config_fields` overrides/extends the attribute names optimum's NormalizedConfig gives."""

    family: str
    layers: Paths
    embeddings: Paths
    attn_module: Paths
    q: Paths
    k: Paths
    v: Paths
    o: Paths
    ffn_module: Paths
    up: Paths
    down: Paths
    act: Paths
    attn_norm: Paths
    ffn_norm: Paths
    norm_position: Literal["pre", "post"]
    gate: Paths = ()
    final_norm: Paths = ()
    hidden_states_end_normed: bool = True  # last hidden state after `final_norm` (HF's tie_last_hidden_states)
    fused_qkv: bool = False
    causal: bool = False
    modality: Literal["text", "image"] = "text"
    config_fields: dict[str, str | None] = field(default_factory=dict)
    heads: Paths = ("classifier", "score", "lm_head", "qa_outputs", "cls", "vocab_projector")


# ---------------------------------------------------------------------------------------------------- capture


class Capture:
    """What `ModelAdapter.capture` recorded in the most recent forward pass; per-layer lists of length
    `num_layers` (entries the pass did not produce stay None). See the module docstring for the exact tensors."""

    def __init__(self, num_layers: int, end_normed: bool = True):
        self.num_layers = num_layers
        self._end_normed = end_normed
        self.embedding_output: torch.Tensor | None = None
        self.final_hidden_state: torch.Tensor | None = None
        self.layer_outputs: list[torch.Tensor | None] = []
        self.attentions: list[torch.Tensor | None] = []
        self.attention_outputs: list[torch.Tensor | None] = []
        self.q: list[torch.Tensor | None] = []
        self.k: list[torch.Tensor | None] = []
        self.v: list[torch.Tensor | None] = []
        self.forward_passes = 0
        self.reset()

    def reset(self) -> None:
        n = self.num_layers
        self.embedding_output = None
        self.final_hidden_state = None
        self.layer_outputs = [None] * n
        self.attentions = [None] * n
        self.attention_outputs = [None] * n
        self.q, self.k, self.v = [None] * n, [None] * n, [None] * n

    @property
    def hidden_states(self) -> list[torch.Tensor | None]:
        """`[embeddings output, layer 1 output, ..., final hidden state]`: num_layers + 1 entries, like HF's
        `output_hidden_states` (last entry after the final norm for GPT-2 / LLaMA / Qwen2); [] if not captured."""
        if self.embedding_output is None:
            return []
        last = self.layer_outputs[-1]
        if self._end_normed and self.final_hidden_state is not None:
            last = self.final_hidden_state
        return [self.embedding_output, *self.layer_outputs[:-1], last]


# ---------------------------------------------------------------------------------------------------- families
FAMILY_SPECS: dict[str, FamilySpec] = {}  # model_type -> its table; filled by compress.models.families


def register_family(spec: FamilySpec) -> None:
    """Add (or replace) the structural table of one `model_type`."""
    FAMILY_SPECS[spec.family] = spec


def supported_families() -> list[str]:
    """The `model_type`s `get_adapter` accepts."""
    return sorted(FAMILY_SPECS)


# ---------------------------------------------------------------------------------------------------- adapter


class ModelAdapter:
    """Uniform structural view of one HF model (see the module docstring). Views are rebuilt on each access of
    `layers`, so they follow physical edits of the model (removed layers, shrunk projections)."""

    def __init__(self, model: nn.Module, spec: FamilySpec, config_fields: dict[str, str | None]):
        self.model = model
        self.spec = spec
        self.family = spec.family
        self.config = model.config
        self.config_fields = config_fields
        base = getattr(model, "base_model", None)
        self.base_model: nn.Module = base if isinstance(base, nn.Module) else model
        self._require(self.base_model, spec.layers, "the layer list", where="")

    # ---- lookup
    def _describe(self) -> str:
        return f"model type '{self.family}' ({type(self.model).__name__})"

    def _require(self, root: nn.Module, candidates: Paths, what: str, where: str) -> Any:
        found = first_path(root, candidates)
        if found is None:
            raise InputError(
                f"{self._describe()} is not supported by compress adapters: missing {what} "
                f"(looked for {where}{' | '.join(candidates)}); supported: {', '.join(supported_families())}"
            )
        return found[1]

    def _optional(self, root: nn.Module, candidates: Paths) -> Any:
        found = first_path(root, candidates)
        return None if found is None else found[1]

    def config_value(self, name: str) -> Any:
        """The config value of a logical field (see `config_fields`), None when the family has no such field."""
        attr = self.config_fields.get(name)
        return None if attr is None else getattr(self.config, attr, None)

    # ---- sizes (from the config; per-layer views read the actual weight shapes)
    @property
    def num_layers(self) -> int:
        return int(self.config_value("num_layers"))

    @property
    def hidden_size(self) -> int:
        return int(self.config_value("hidden_size"))

    @property
    def num_heads(self) -> int:
        return int(self.config_value("num_heads"))

    @property
    def num_kv_heads(self) -> int:
        value = self.config_value("num_kv_heads")
        return int(value) if value is not None else self.num_heads

    @property
    def head_dim(self) -> int:
        value = self.config_value("head_dim")
        return int(value) if value is not None else self.hidden_size // self.num_heads

    @property
    def intermediate_size(self) -> int:
        value = self.config_value("intermediate_size")
        return int(value) if value is not None else 4 * self.hidden_size  # GPT-2: n_inner None means 4*d

    @property
    def vocab_size(self) -> int | None:
        value = self.config_value("vocab_size")
        return None if value is None else int(value)

    @property
    def causal(self) -> bool:
        """True for decoder-only (causal) families."""
        return self.spec.causal

    @property
    def modality(self) -> str:
        return self.spec.modality

    # ---- modules
    @property
    def embeddings(self) -> nn.Module:
        """The embedding module: the embeddings block (BERT, RoBERTa, DistilBERT, ViT) or the token embedding
        (GPT-2 `wte`, LLaMA/Qwen2 `embed_tokens`)."""
        return self._require(self.base_model, self.spec.embeddings, "the embeddings", where="")

    @property
    def final_norm(self) -> nn.Module | None:
        """The norm after the last layer (ViT, GPT-2, LLaMA, Qwen2), None for post-norm encoders."""
        return self._optional(self.base_model, self.spec.final_norm)

    @property
    def head(self) -> nn.Module | None:
        """The task head on top of the base model (classifier / lm_head / score ...), None for a bare base model."""
        if self.base_model is self.model:
            return None
        for name in self.spec.heads:
            module = getattr(self.model, name, None)
            if isinstance(module, nn.Module) and module is not self.base_model:
                return module
        return None

    @property
    def layer_list(self) -> nn.ModuleList:
        """The `nn.ModuleList` of layers (replace it to drop layers; then rewrite `config_fields['num_layers']`)."""
        return self._require(self.base_model, self.spec.layers, "the layer list", where="")

    @property
    def layers(self) -> list[LayerView]:
        return [self._layer_view(i, layer) for i, layer in enumerate(self.layer_list)]

    def _layer_view(self, index: int, layer: nn.Module) -> LayerView:
        s = self.spec
        where = f"layers[{index}]."

        def req(candidates: Paths, what: str) -> Any:
            return self._require(layer, candidates, what, where)

        q, k = req(s.q, "the query projection"), req(s.k, "the key projection")
        v, o = req(s.v, "the value projection"), req(s.o, "the output projection")
        head_dim = self.head_dim
        if s.fused_qkv:  # [q | k | v] with q = heads*hd, k = v = kv_heads*hd; GPT-2 is MHA
            total = out_features(q)
            kv_w = (total - self.num_heads * head_dim) // 2
            num_heads, num_kv = self.num_heads, kv_w // head_dim
            if num_kv != self.num_kv_heads:  # a pruned fused projection: assume equal thirds (MHA)
                num_heads = num_kv = total // (3 * head_dim)
        else:
            num_heads, num_kv = out_features(q) // head_dim, out_features(k) // head_dim
        attention = AttentionView(
            module=req(s.attn_module, "the attention module"), q=q, k=k, v=v, o=o,
            num_heads=num_heads, num_kv_heads=num_kv, head_dim=head_dim, fused_qkv=s.fused_qkv,
        )
        up = req(s.up, "the FFN up projection")
        ffn = FFNView(
            module=req(s.ffn_module, "the FFN module"), up=up, down=req(s.down, "the FFN down projection"),
            gate=req(s.gate, "the FFN gate projection") if s.gate else None,
            intermediate_size=out_features(up), act=self._optional(layer, s.act),
        )
        return LayerView(
            index=index, module=layer, attention=attention, ffn=ffn,
            attn_norm=req(s.attn_norm, "the attention norm"), ffn_norm=req(s.ffn_norm, "the FFN norm"),
            norm_position=s.norm_position,
        )

    # ---- capture
    @contextmanager
    def capture(
        self,
        *,
        hidden_states: bool = True,
        attentions: bool = False,
        attention_outputs: bool = False,
        qkv: bool = False,
        detach: bool = False,
    ) -> Iterator[Capture]:
        """Record intermediate tensors of the forward passes run inside the context (see the module docstring)."""
        layers = self.layers
        tie = getattr(self.config, "tie_last_hidden_states", None)
        cap = Capture(len(layers), end_normed=self.spec.hidden_states_end_normed if tie is None else bool(tie))
        handles: list[torch.utils.hooks.RemovableHandle] = []
        previous_attn: tuple[bool, Any] | None = None

        def keep(t: torch.Tensor | None) -> torch.Tensor | None:
            return t.detach() if (detach and t is not None) else t

        def start_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            cap.reset()
            cap.forward_passes += 1
            if hidden_states:
                cap.embedding_output = keep(_first_tensor(args, kwargs, "hidden_states"))

        try:
            if not layers:
                raise InputError(f"{self._describe()}: the model has no layers to capture")
            handles.append(layers[0].module.register_forward_pre_hook(start_hook, with_kwargs=True))
            if attentions and getattr(self.config, "_attn_implementation", None) not in PROBS_ATTENTION:
                previous_attn = _set_attn_implementation(self.model, "eager")
            for lv in layers:
                i, att = lv.index, lv.attention
                if hidden_states:
                    handles.append(lv.module.register_forward_hook(_into(cap, "layer_outputs", i, keep)))
                removed = getattr(att.module, "removed", False)  # pruned away (compress.prune.units): entries stay None
                if attentions and not removed:
                    handles.append(att.module.register_forward_hook(self._probs_hook(cap, i, keep)))
                if attention_outputs and not removed:
                    handles.append(att.o.register_forward_hook(_into(cap, "attention_outputs", i, keep)))
                if qkv and att.fused_qkv:
                    handles.append(att.q.register_forward_hook(_fused_qkv_hook(cap, i, att, keep)))
                elif qkv:
                    for kind in ("q", "k", "v"):
                        handles.append(att.proj_module(kind).register_forward_hook(_into(cap, kind, i, keep)))
            final_norm = self.final_norm
            if hidden_states and final_norm is not None:
                def final_hook(module: nn.Module, args: tuple, output: Any) -> None:
                    cap.final_hidden_state = keep(_main_output(output))

                handles.append(final_norm.register_forward_hook(final_hook))
            yield cap
        finally:
            for handle in handles:
                handle.remove()
            if previous_attn is not None:
                _restore_attn_implementation(self.model, previous_attn)

    def _probs_hook(self, cap: Capture, index: int, keep: Callable) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            probs = output[1] if isinstance(output, (tuple, list)) and len(output) > 1 else None
            if probs is None:
                raise CompressError(
                    f"{self._describe()}: attention module of layer {index} ({type(module).__name__}) returned no "
                    "probabilities under eager attention; this transformers version is not supported for "
                    "attention capture"
                )
            cap.attentions[index] = keep(probs)

        return hook

    def __repr__(self) -> str:
        return (f"ModelAdapter({self.family}: layers={self.num_layers}, hidden={self.hidden_size}, "
                f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"ffn={self.intermediate_size})")


def _into(cap: Capture, attr: str, index: int, keep: Callable) -> Callable:
    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        getattr(cap, attr)[index] = keep(_main_output(output))

    return hook


def _fused_qkv_hook(cap: Capture, index: int, att: AttentionView, keep: Callable) -> Callable:
    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        q, k, v = att.split_qkv(_main_output(output))
        cap.q[index], cap.k[index], cap.v[index] = keep(q), keep(k), keep(v)

    return hook


def _set_attn_implementation(model: nn.Module, impl: str) -> tuple[bool, Any] | None:
    """Switch to `impl`; returns what `_restore_attn_implementation` needs, None when nothing changed."""
    config = getattr(model, "config", None)
    previous = getattr(config, "_attn_implementation", None)
    if config is None or previous == impl:
        return None
    setter = getattr(model, "set_attn_implementation", None)
    if callable(setter):
        try:
            setter(impl)
            return True, previous
        except (ValueError, ImportError, TypeError) as err:
            log.debug("set_attn_implementation(%r) failed (%s); setting the config attribute", impl, err)
    config._attn_implementation = impl
    return False, previous


def _restore_attn_implementation(model: nn.Module, saved: tuple[bool, Any]) -> None:
    used_setter, previous = saved
    if used_setter and previous is not None:
        try:
            model.set_attn_implementation(previous)  # type: ignore[operator]
            return
        except (ValueError, ImportError, TypeError) as err:
            log.debug("restoring attention implementation %r failed (%s)", previous, err)
    model.config._attn_implementation = previous
