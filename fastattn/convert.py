"""``fastattn.convert(model)``: swap a model's modules for fastattn's, in place.

What is replaced (exact classes only: a subclass may have changed ``forward``):

    attention=True    nn.MultiheadAttention        -> fastattn.nn.MultiheadAttention (shares weights)
                      transformers models           -> attn_implementation "fastattn" (through
                                                       fastattn.integrations.transformers), or a
                                                       module swap for models that do not use
                                                       transformers' AttentionInterface
    layer_norm=True   nn.LayerNorm                  -> fastattn.nn.LayerNorm
                      nn.RMSNorm, and transformers-style RMS norms (a class named *RMSNorm or
                      with ``variance_epsilon``: LlamaRMSNorm, T5LayerNorm, ...) with a 1-D
                      ``weight`` only, whose output matches fastattn.nn.RMSNorm on a random
                      input; Gemma's ``x_hat * (1 + weight)`` norms (GemmaRMSNorm,
                      Gemma2RMSNorm, ...) become fastattn.nn.RMSNorm(offset=1.0) with the
                      same weight, found the same way
    int8=True         nn.Linear                     -> fastattn.nn.Int8Linear ("auto": weight-only
                                                       or W8A8 per call; see convert), except the
                      out_proj of a MultiheadAttention (read as a weight by its forward) and
                      linears whose weight is tied to another linear; a linear tied to an
                      nn.Embedding (an lm_head) gets an int8 copy, the embedding keeps its weight
    attention=True,   Llama-style transformers decoder layers (fastattn.integrations.decoder):
    transformers      one GEMM for q/k/v and one for gate/up, rotary + KV-cache append +
                      attention in one kernel call per decoding step, SiLU*mul fused, the
                      residual add in the RMSNorm; same modules and state_dict. Their float
                      projections and the model's float CPU lm_head (class swapped to
                      fastattn.nn.Linear, ties kept) run fastattn.linear
    attention=True,   BERT-style transformers encoder layers (BERT, RoBERTa, XLM-R, ELECTRA;
    transformers      fastattn.integrations.encoder): one GEMM for q/k/v, the attention kernel
                      on its strided views, the residual adds inside the LayerNorm kernel, GELU
                      in place; same modules and state_dict; float projections run
                      fastattn.linear

The walk is post-order (children first, then the module itself, the root included), keeps each
module's device, dtype and train/eval mode, and replaces a module shared at several places by one
shared replacement. ``filter_fn(module, fqn) -> bool`` is asked about every candidate; False keeps
it. Converting twice is harmless.

Modules torch would bypass are fixed so the kernels really run: an nn.TransformerEncoderLayer whose
children were converted becomes a ``ConvertedTransformerEncoderLayer`` (same class otherwise,
same state_dict) whose forward never takes torch's fused inference "fast path"
(torch._transformer_encoder_layer_fwd reads the attention weights and never calls self_attn), and
an nn.TransformerEncoder holding such layers gets ``use_nested_tensor = False`` (its nested-tensor
path would feed NestedTensors to the layers).

The result is logged at INFO on the "fastattn" logger and stored on the returned model as
``model.fastattn_report`` (a ``ConversionReport``; ``print`` it). Always use the returned model:
when the root itself is replaced (e.g. ``convert(nn.MultiheadAttention(...))``) it is a new object.
"""

from __future__ import annotations

import inspect
import logging
import sys
import types
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

log = logging.getLogger("fastattn")

__all__ = ["ConversionReport", "ConvertedTransformerEncoderLayer", "convert"]


@dataclass
class ConversionReport:
    """What ``convert`` did. ``replaced`` maps "old -> new" to the fully qualified names of the
    modules replaced ("" is the root); ``kept`` lists candidates left as they were, with why;
    ``notes`` says what else was changed (fast paths disabled, attention implementations set)."""

    replaced: dict[str, list[str]] = field(default_factory=dict)
    kept: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def num_replaced(self) -> int:
        return sum(len(v) for v in self.replaced.values())

    def _add(self, kind: str, fqn: str) -> None:
        self.replaced.setdefault(kind, []).append(fqn)

    def __str__(self) -> str:
        name = lambda fqn: fqn or "<root>"
        lines = [f"fastattn.convert: replaced {self.num_replaced()} module(s)"]
        for kind, fqns in self.replaced.items():
            shown = ", ".join(name(f) for f in fqns[:6]) + (", ..." if len(fqns) > 6 else "")
            lines.append(f"  {len(fqns):4d} x {kind}: {shown}")
        if self.kept:
            lines.append(f"  kept {len(self.kept)} candidate(s) unchanged:")
            lines += [f"    {name(f)}: {why}" for f, why in self.kept]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _hooked(m: nn.Module) -> bool:
    """Whether forward hooks (the module's or global ones) would see m's inputs/outputs."""
    from torch.nn.modules import module as _module

    return bool(m._forward_hooks or m._forward_pre_hooks or _module._global_forward_hooks
                or _module._global_forward_pre_hooks)


class ConvertedTransformerEncoderLayer(nn.TransformerEncoderLayer):
    """nn.TransformerEncoderLayer that always runs its submodules.

    torch's forward takes a fused inference path (eval mode, no grad, batch_first, ...) that calls
    torch._transformer_encoder_layer_fwd with the raw weights, bypassing ``self_attn``, the norms
    and the linears. This forward is torch's other branch, with the same results and two fusions
    of its own: each residual add runs inside the LayerNorm kernel that follows it (norm(x + y)
    and x + y in one pass, when the norm is a fastattn norm without hooks), and a ReLU after
    ``linear1`` is applied in place (when no hook sees linear1's output). Masks are passed through
    as given (fastattn.nn.MultiheadAttention takes bool and float masks alike).
    """

    def _add_norm(self, norm: nn.Module, y: torch.Tensor, x: torch.Tensor):
        """(norm(x + y), x + y)."""
        from fastattn.nn.norm import LayerNorm, RMSNorm

        if isinstance(norm, (LayerNorm, RMSNorm)) and not _hooked(norm):
            return norm(y, residual=x)  # the kernel rounds x + y to x's dtype, as eager does
        s = x + y
        return norm(s), s

    def _ff_block(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear1(x)
        if getattr(self, "activation_relu_or_gelu", 0) == 1 and not _hooked(self.linear1):
            h = torch.relu_(h)  # a fresh tensor; relu's backward needs only its output
        else:
            h = self.activation(h)
        return self.dropout2(self.linear2(self.dropout(h)))

    def forward(
        self,
        src: torch.Tensor,
        src_mask: torch.Tensor | None = None,
        src_key_padding_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        x = src
        if self.norm_first:
            sa = self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
            h, x = self._add_norm(self.norm2, sa, x)
            x = x + self._ff_block(h)
        else:
            sa = self._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal)
            x, _ = self._add_norm(self.norm1, sa, x)
            x, _ = self._add_norm(self.norm2, self._ff_block(x), x)
        return x


def _is_fastattn(m: nn.Module) -> bool:
    return type(m).__module__.startswith("fastattn.")


def _qualname(cls: type) -> str:
    mod = cls.__module__
    if mod.startswith("torch.nn.modules"):
        return f"nn.{cls.__name__}"
    if mod.startswith("fastattn."):
        return f"fastattn.nn.{cls.__name__}" if mod.startswith("fastattn.nn") else cls.__name__
    return cls.__name__


def _hf_rms_norm_eps(m: nn.Module) -> float | None:
    """eps of a transformers-style RMS norm (LlamaRMSNorm & co., T5LayerNorm: a class named
    *RMSNorm, or any with transformers' ``variance_epsilon``), None if m does not look like one.
    Looking like one is not enough: the caller also checks the output."""
    if isinstance(m, (nn.RMSNorm, nn.LayerNorm)) or _is_fastattn(m):
        return None
    if not (type(m).__name__.endswith("RMSNorm") or hasattr(m, "variance_epsilon")):
        return None
    w = m._parameters.get("weight")
    eps = getattr(m, "variance_epsilon", getattr(m, "eps", None))
    if not isinstance(w, nn.Parameter) or w.dim() != 1 or not isinstance(eps, (int, float)):
        return None
    if len(m._parameters) != 1 or any(b is not None for b in m._buffers.values()) or m._modules:
        return None
    if len(inspect.signature(m.forward).parameters) != 1:
        # a norm with more inputs (Mamba2's MambaRMSNormGated(x, gate)) computes something else
        # whenever they are given, which the random-input check, calling it with x alone, misses
        return None
    return float(eps)


def _cpu_copy(m: nn.Module) -> nn.Module:
    """A copy of a module on the meta device, on the CPU, with random parameters."""
    import copy

    m = copy.deepcopy(m).to_empty(device="cpu")
    gen = torch.Generator().manual_seed(4321)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
    return m


def _matches_on_random_input(old: nn.Module, new: nn.Module, features: int, dtype) -> bool:
    """Whether two norms agree on a random (8, features) input. Runs forward without hooks and
    with a private generator (the global RNG state is left untouched)."""
    device = next(old.parameters()).device
    if device.type == "meta":
        # a model built without weights (fastattn.load_converted): compare copies on the CPU
        # with random weights; the forward, not the values, is what is checked
        old, new = _cpu_copy(old), _cpu_copy(new)
        new.weight = old.weight  # the swap shares the weight; so do the copies
        device = torch.device("cpu")
    gen = torch.Generator(device=device).manual_seed(1234)
    x = torch.randn(8, features, generator=gen, device=device, dtype=torch.float32).to(dtype)
    try:
        with torch.no_grad():
            a = type(old).forward(old, x)
            b = type(new).forward(new, x)
    except Exception:  # a module that does not take (rows, features) input is not a plain norm
        return False
    if not isinstance(a, torch.Tensor) or a.shape != b.shape:
        return False
    tol = 1e-4 if dtype in (torch.float32, torch.float64) else 2e-2
    return torch.allclose(a.float(), b.float(), rtol=tol, atol=tol)


class _Converter:
    def __init__(self, model, attention, layer_norm, int8, filter_fn):
        self.attention, self.layer_norm, self.int8 = attention, layer_norm, int8
        self.filter_fn = filter_fn
        self.report = ConversionReport()
        self.memo: dict[int, nn.Module] = {}
        self.unavailable: dict[str, str] = {}
        # parameters used by several modules (tied weights) are not quantized
        self.param_uses = Counter(id(p) for m in model.modules()
                                  for p in m._parameters.values() if p is not None)
        self.embedding_weights = {id(m.weight) for m in model.modules()
                                  if type(m) is nn.Embedding}
        hf = sys.modules.get("transformers")
        self.hf_pretrained = getattr(hf, "PreTrainedModel", None) if hf is not None else None

    # -----------------------------------------------------------------------------------------
    def walk(self, module: nn.Module, fqn: str, parent: nn.Module | None) -> nn.Module:
        if id(module) in self.memo:
            return self.memo[id(module)]
        for name, child in list(module._modules.items()):
            if child is None:
                continue
            new = self.walk(child, f"{fqn}.{name}" if fqn else name, module)
            if new is not child:
                module._modules[name] = new
        new = self.replace(module, fqn, parent)
        self.memo[id(module)] = new
        return new

    def _allowed(self, module, fqn) -> bool:
        if self.filter_fn is not None and not self.filter_fn(module, fqn):
            self.report.kept.append((fqn, "filter_fn returned False"))
            return False
        return True

    def _load(self, name: str):
        """fastattn.nn.<name>, or None (reported once) when this build does not have it."""
        if name in self.unavailable:
            return None
        try:
            import fastattn.nn

            return getattr(fastattn.nn, name)
        except (ImportError, AttributeError) as e:
            self.unavailable[name] = f"fastattn.nn.{name} is unavailable ({e})"
            self.report.notes.append(self.unavailable[name] + ": those modules were kept")
            return None

    def _swap(self, old: nn.Module, new: nn.Module, fqn: str) -> nn.Module:
        new.train(old.training)
        self.report._add(f"{_qualname(type(old))} -> {_qualname(type(new))}", fqn)
        return new

    def replace(self, module: nn.Module, fqn: str, parent: nn.Module | None) -> nn.Module:
        t = type(module)
        if self.attention and t is nn.MultiheadAttention:
            if not self._allowed(module, fqn):
                return module
            from fastattn.nn.attention import MultiheadAttention

            return self._swap(module, MultiheadAttention.from_module(module), fqn)
        if self.layer_norm and t in (nn.LayerNorm, nn.RMSNorm):
            cls = self._load(t.__name__)
            if cls is None or not self._allowed(module, fqn):
                return module
            return self._swap(module, cls.from_module(module), fqn)
        if self.layer_norm and (eps := _hf_rms_norm_eps(module)) is not None:
            return self._replace_hf_rms_norm(module, fqn, eps)
        if self.int8 and t is nn.Linear:
            return self._replace_linear(module, fqn, parent)
        if t is nn.TransformerEncoderLayer and any(_is_fastattn(c) for c in module.children()):
            module.__class__ = ConvertedTransformerEncoderLayer
            self.report._add("nn.TransformerEncoderLayer -> ConvertedTransformerEncoderLayer "
                             "(torch's fused fast path disabled)", fqn)
            return module
        if isinstance(module, nn.TransformerEncoder) and getattr(module, "use_nested_tensor", False):
            if any(isinstance(layer, ConvertedTransformerEncoderLayer) for layer in module.layers):
                module.use_nested_tensor = False
                self.report.notes.append(f"{fqn or '<root>'}: nn.TransformerEncoder nested-tensor "
                                         "fast path disabled (use_nested_tensor = False)")
            return module
        if self.attention and self.hf_pretrained is not None:
            from fastattn.integrations import transformers as hf_integration

            new_cls, why = hf_integration.attention_module_class(module)
            if why is not None:
                self.report.kept.append((fqn, why))
            elif new_cls is not None and self._allowed(module, fqn):
                # same object, same state: only forward changes
                self.report._add(f"{t.__name__} -> {new_cls.__name__}", fqn)
                module.__class__ = new_cls
        return module

    def _replace_hf_rms_norm(self, module, fqn, eps):
        cls = self._load("RMSNorm")
        if cls is None or not self._allowed(module, fqn):
            return module
        w = module.weight
        # x / rms(x) * weight (Llama & co.), else x / rms(x) * (1 + weight) (Gemma: the weight is
        # stored zero-centred; the kernel adds the offset in float32, so no weight is rewritten)
        for offset in (0.0, 1.0):
            new = cls(w.shape[0], eps=eps, device=w.device, dtype=w.dtype, offset=offset)
            new.weight = w  # shared, as every swap here
            if _matches_on_random_input(module, new, w.shape[0], w.dtype):
                return self._swap(module, new, fqn)
        self.report.kept.append((fqn, f"{type(module).__name__} does not compute "
                                      "x / rms(x) * weight or x / rms(x) * (1 + weight) "
                                      "(checked on a random input)"))
        return module

    def _replace_linear(self, module, fqn, parent):
        if isinstance(parent, nn.MultiheadAttention):
            return module  # out_proj: its weight is read directly by the attention forward
        tied_to_embedding = id(module.weight) in self.embedding_weights
        if self.param_uses[id(module.weight)] > 1 and not tied_to_embedding:
            self.report.kept.append((fqn, "weight is tied to another module"))
            return module
        cls = self._load("Int8Linear")
        if cls is None or not self._allowed(module, fqn):
            return module
        activations = {"w8a8": "int8", "weight_only": "float", "auto": "auto"}[self.int8]
        new = self._swap(module, cls.from_float(module, activations=activations), fqn)
        if tied_to_embedding:
            # an output projection tied to the input embedding (lm_head): the embedding keeps
            # its float weight (a lookup reads one row per token), the projection, which reads
            # the whole matrix per token, gets an int8 copy
            self.report.notes.append(f"{fqn}: weight tied to an nn.Embedding; quantized as a "
                                     "copy (the embedding keeps its float weight, the tie is "
                                     "not kept)")
        return new

    # -----------------------------------------------------------------------------------------
    def finish_transformers(self, root: nn.Module) -> None:
        """attn_implementation = "fastattn" on every transformers model inside ``root``."""
        if not self.attention or self.hf_pretrained is None:
            return
        from fastattn.integrations import transformers as hf_integration

        for fqn, m in root.named_modules():
            if not isinstance(m, self.hf_pretrained):
                continue
            if self.filter_fn is not None and not self.filter_fn(m, fqn):
                self.report.kept.append((fqn, "filter_fn returned False (attn_implementation)"))
                continue
            note = hf_integration.use_fastattn(m)
            if note:
                self.report.notes.append(f"{fqn or '<root>'}: {note}")

    def _fuse(self, root: nn.Module, fuse, label: str) -> list[str]:
        """Runs an integration's ``fuse(root, allowed) -> (fqns, [(fqn, why kept)])`` on the
        transformers blocks of ``root`` and reports what it did. (The callers import the
        integration only for a transformers model: the integrations import transformers.)"""
        fused, kept = fuse(root, self.filter_fn or (lambda m, fqn: True))
        for fqn in fused:
            self.report._add(label, fqn)
        self.report.kept += kept
        return fused

    def finish_decoders(self, root: nn.Module) -> None:
        """Llama-style transformers decoder layers: fused projections and decoding step."""
        if not self.attention or self.hf_pretrained is None:
            return
        from fastattn.integrations.decoder import fuse_decoder_layers

        if self._fuse(root, fuse_decoder_layers,
                      "decoder layer -> fused decoder layer (q/k/v and gate/up GEMMs, rotary + "
                      "KV-cache attention, SiLU*mul)"):
            self._stream_output_embeddings(root)

    def finish_encoders(self, root: nn.Module) -> None:
        """BERT-style transformers encoder layers: one q/k/v GEMM, the residual adds inside the
        LayerNorm kernel, GELU in place."""
        if not self.attention or self.hf_pretrained is None:
            return
        from fastattn.integrations.encoder import fuse_encoder_layers

        self._fuse(root, fuse_encoder_layers,
                   "encoder layer -> fused encoder layer (q/k/v GEMM, attention on its strided "
                   "views, residual adds in the LayerNorms)")

    def finish_mamba(self, root: nn.Module) -> None:
        """Mamba / Mamba2 / FalconMamba blocks: each block's residual add inside the next
        block's RMSNorm kernel, the residual stream kept in float32 where the model does."""
        if not self.layer_norm or self.hf_pretrained is None:
            return
        from fastattn.integrations.mamba import fuse_mamba_blocks

        self._fuse(root, fuse_mamba_blocks,
                   "Mamba block -> fused Mamba block (residual add inside the next block's "
                   "RMSNorm, float32 residual stream kept by the kernel)")

    def finish_parallel_norms(self, root: nn.Module) -> None:
        """Parallel-residual blocks (GPT-NeoX, Falcon): their two LayerNorms of the same input
        computed by one kernel call (weight1 / bias1)."""
        if not self.layer_norm or self.hf_pretrained is None:
            return
        from fastattn.integrations.parallel import pair_parallel_norms

        self._fuse(root, pair_parallel_norms,
                   "parallel block: its two LayerNorms of the same input in one kernel call "
                   "(weight1 / bias1)")

    def _stream_output_embeddings(self, root: nn.Module) -> None:
        """The float output projection (lm_head) of a model whose decoder layers were fused runs
        fastattn.linear: at each decoding step it reads the largest matrix of a small model
        (SmolLM2-135M: 576 x 49152). Its class is swapped, so ties and the state_dict stay."""
        from fastattn.nn.linear import Linear

        for fqn, m in root.named_modules():
            get = getattr(m, "get_output_embeddings", None)
            if not isinstance(m, self.hf_pretrained) or get is None:
                continue
            head = get()
            if type(head) is not nn.Linear or head.weight.device.type != "cpu":
                continue
            name = next((n for n, c in m.named_modules() if c is head), None)
            full = f"{fqn}.{name}" if fqn else name
            if self._allowed(head, full):
                Linear.from_module(head)
                self.report._add("nn.Linear -> fastattn.nn.Linear", full)


def convert(
    model: nn.Module,
    *,
    attention: bool = True,
    layer_norm: bool = True,
    int8: bool | str = False,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
) -> nn.Module:
    """Replace ``model``'s attention, LayerNorm/RMSNorm and (with int8=True) Linear modules by
    fastattn's, in place; return the model (a new object only if the root itself was replaced).

    Args:
        model: any nn.Module: torch Transformer layers, a transformers PreTrainedModel, ...
        attention: replace nn.MultiheadAttention; route transformers models' attention to fastattn.
        layer_norm: replace nn.LayerNorm, nn.RMSNorm and transformers-style *RMSNorm modules.
        int8: replace nn.Linear by fastattn.nn.Int8Linear (inference). ``True`` or ``"auto"``:
            int8 weights, the activations' handling chosen per call (``activations="auto"``):
            weight-only kernel up to 16 rows (decoding), above it W8A8 with LLM.int8()'s outlier
            decomposition on CUDA, and weight-only on the CPU with float32 activations rounded
            to bfloat16 for the products where the CPU has bfloat16 dot products (see
            fastattn.nn.linear).
            ``"weight_only"``: float activations at every size. ``"w8a8"``: activations
            quantized per token at every size above WEIGHT_ONLY_MAX_M, no outlier decomposition
            (activation outliers of post-LN encoders such as BERT then cost ~1% cosine on
            all-MiniLM-L6-v2 embeddings).
        filter_fn: ``filter_fn(module, fqn) -> bool``; only candidates it returns True for are
            replaced ("" is the fqn of the root).

    The result is logged and stored as ``model.fastattn_report`` (see ``ConversionReport``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"filter_fn must be callable(module, fqn) -> bool, got {filter_fn!r}")
    if int8 not in (False, True, "auto", "weight_only", "w8a8"):
        raise ValueError(
            f"int8 must be False, True, 'auto', 'weight_only' or 'w8a8', got {int8!r}")
    int8 = "auto" if int8 is True else int8
    conv = _Converter(model, bool(attention), bool(layer_norm), int8, filter_fn)
    new_root = conv.walk(model, "", None)
    conv.finish_transformers(new_root)
    conv.finish_decoders(new_root)
    conv.finish_encoders(new_root)
    conv.finish_mamba(new_root)
    conv.finish_parallel_norms(new_root)
    new_root.fastattn_report = conv.report
    _record_conversion(new_root, dict(attention=bool(attention), layer_norm=bool(layer_norm),
                                      int8=int8 or False), filter_fn)
    log.info("%s", conv.report)
    return new_root


def _record_conversion(model: nn.Module, args: dict, filter_fn) -> None:
    """Keeps convert's arguments with the model, for fastattn.load_converted: as
    ``model.fastattn_conversion`` and, on a transformers model, in its config (``save_pretrained``
    writes it to config.json as "fastattn")."""
    if filter_fn is not None:
        args["filter_fn"] = True  # not serialisable: load_converted asks for it again
    model.fastattn_conversion = args
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        config.fastattn = {k: v for k, v in args.items()}


class _CallableModule(types.ModuleType):
    # `import fastattn.convert` binds this module as the attribute `fastattn.convert`, shadowing
    # the function that `fastattn.__getattr__` resolves lazily; calling the module calls convert so
    # `fastattn.convert(model)` works whichever of the two a user ends up holding.
    def __call__(self, *args, **kwargs):
        return convert(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
