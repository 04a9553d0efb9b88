"""Fused decoder layers for Llama-style ``transformers`` models (Llama, SmolLM, Mistral, Qwen2).

``fastattn.convert`` gives each decoder layer of such a model (same object, same parameters,
same state_dict) a forward that, in inference (no gradient recording), runs

    input RMSNorm -> one GEMM for q/k/v -> [decoding: rotary + KV-cache append + attention in one
    ``attention_with_kvcache`` call] -> o_proj -> residual add inside the post-attention RMSNorm
    -> one GEMM for gate/up -> ``silu_mul`` -> down_proj -> residual add

instead of transformers' ~60 separate PyTorch calls per layer and token. The q/k/v and gate/up
weights are concatenated once; the projections' own parameters (or int8 buffers) become views
into the concatenation, so the state_dict, ``load_state_dict`` (in place) and the modules a user
holds stay as they were. ``.to()``/``.half()`` re-fuse.

When each path runs:
- With gradient recording (any call outside ``no_grad``/``inference_mode``) or in train mode
  (attention dropout) the layer runs transformers' own forward: gradients land on the
  projections' own parameters.
- A decoding step (at most ``DECODE_MAX_QUERIES`` new tokens against a non-empty cache, no
  sliding window, a rotary embedding whose frequencies do not change with the length) with a
  ``DynamicCache`` or ``StaticCache`` layer runs the fused KV-cache kernel. A dynamic cache layer
  is given a preallocated buffer that grows by doubling (its ``keys``/``values`` are views of the
  filled part), so a step appends in place instead of concatenating the whole cache. Masks are
  accepted when they describe left padding and the causal diagonal (checked exactly, once per
  step) and ``position_ids`` must be the positions that padding implies (checked once per step).
- Under torch.compile (transformers' compiled decoding: a static cache and the step compiled with
  fullgraph=True) a step with a ``StaticCache`` runs the same kernel call, its plan read off the
  mask with tensor ops and checked by an in-graph assertion (``torch._assert_async``) instead of
  on the host: a compiled step whose mask is not left padding + the causal diagonal raises.
- Anything else (prefill, other caches or masks, dynamic caches under torch.compile) runs the
  attention as transformers does (rotary in PyTorch, ``cache.update``, the model's attention
  implementation) with the fused GEMMs.
"""

from __future__ import annotations

import functools
import sys

import torch
import torch.nn.functional as F
from torch import nn

from fastattn.integrations.transformers import (
    DECODE_MAX_QUERIES,
    _cache_layout,
    _mask_fits,
    _mask_ranges,
)

__all__ = ["FUSED_FAMILIES", "fuse_decoder_layers"]

# decoder layers whose forward is exactly input_layernorm -> self_attn (q/k/v/o_proj, rotary) ->
# residual -> post_attention_layernorm -> mlp (gate/up/down, SiLU) -> residual (transformers 4.57)
FUSED_FAMILIES = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer")
# rotary types whose inverse frequencies are fixed at load time (a table indexed by position holds
# them exactly); "dynamic" and "longrope" change with the sequence length
_STATIC_ROPE = ("default", "linear", "llama3")


# ---------------------------------------------------------------------------------------------
# fused projections
# ---------------------------------------------------------------------------------------------
def _linear_kind(m: nn.Module):
    """("float", None) for nn.Linear, ("int8", activations) for fastattn.nn.Int8Linear, else None."""
    from fastattn.nn import Int8Linear

    if type(m) is nn.Linear:
        return ("float", None)
    if type(m) is Int8Linear:
        return ("int8", m.activations)
    return None


def _fusable(linears) -> bool:
    kinds = {_linear_kind(m) for m in linears}
    if len(kinds) != 1 or None in kinds:
        return False
    w = [m.weight for m in linears]
    return (len({(t.dtype, t.device, t.shape[1]) for t in w}) == 1
            and len({m.bias is None for m in linears}) == 1)


def _concat_views(modules, name: str, dim0_sizes) -> torch.Tensor | None:
    """Concatenates ``module.<name>`` of each module along dim 0 and makes each module's tensor a
    view into the concatenation (a parameter stays a parameter, a buffer a buffer)."""
    parts = [getattr(m, name) for m in modules]
    if parts[0] is None:
        return None
    fused = torch.cat([p.detach() for p in parts], 0)
    start = 0
    for m, p, n in zip(modules, parts, dim0_sizes, strict=True):
        view = fused[start:start + n]
        start += n
        if isinstance(p, nn.Parameter):
            setattr(m, name, nn.Parameter(view, requires_grad=p.requires_grad))
        else:
            setattr(m, name, view)
    return fused


def _float_linear(weight, bias):
    """x -> F.linear(x, weight, bias): fastattn.linear on the CPU (the weight streamed at the
    memory's speed when decoding), F.linear elsewhere."""
    import fastattn

    fn = fastattn.linear if weight.device.type == "cpu" else F.linear
    return functools.partial(fn, weight=weight, bias=bias)


def _projection(m: nn.Module):
    """A function x -> m(x): a float nn.Linear as _float_linear (its own parameters), any other
    module (Int8Linear, ...) itself."""
    if _linear_kind(m) == ("float", None):
        return _float_linear(m.weight, m.bias)
    return m


def _fused_projection(linears):
    """A function x -> cat([l(x) for l in linears], -1) computed by one GEMM."""
    import fastattn

    sizes = [m.weight.shape[0] for m in linears]
    weight = _concat_views(linears, "weight", sizes)
    bias = _concat_views(linears, "bias", sizes)
    kind, activations = _linear_kind(linears[0])
    if kind == "float":
        return _float_linear(weight, bias)
    scale = _concat_views(linears, "weight_scale", sizes)
    first = linears[0]
    # one Int8Linear over the concatenation, not registered anywhere: its forward makes the same
    # per-call choice as the projections' own
    fused = fastattn.nn.Int8Linear(first.in_features, sum(sizes), bias=bias is not None,
                                   device="meta", backend=first.backend, activations=activations)
    fused.weight, fused.weight_scale = weight, scale
    if bias is not None:
        fused.bias = nn.Parameter(bias, requires_grad=False)
    return fused.forward


# ---------------------------------------------------------------------------------------------
# the decoding step: where each sequence is in the cache
# ---------------------------------------------------------------------------------------------
def _step_plan(cache_layer, attention_mask, position_ids, cache_position, B: int, L: int):
    """(cache_seqlens int32 (B,), cache_leftpad int32 (B,) or None) for a decoding step whose new
    tokens go to cache positions [seqlens[b], seqlens[b] + L) of every sequence, or None when this
    step is not one the KV-cache kernel can run exactly. Kept on ``cache_position`` (one tensor
    per step, shared by the layers), so the host checks run once per step."""
    from transformers.cache_utils import DynamicLayer, StaticLayer

    t = type(cache_layer)
    if t is DynamicLayer:
        if not cache_layer.is_initialized or cache_layer.keys.dim() != 4:
            return None
        start = cache_layer.keys.shape[2]
        kv_len = start + L
    elif t is StaticLayer:
        if not cache_layer.is_initialized or cache_position is None:
            return None
        start = None  # read from cache_position below
        kv_len = cache_layer.max_cache_len
    else:
        return None
    holder = cache_position if cache_position is not None else attention_mask
    key = (t, start, kv_len, B, L, id(attention_mask), id(position_ids))
    memo = None if holder is None else holder.__dict__.get("_fastattn_step")
    if memo is not None and memo[0] == key:
        return memo[1]
    plan = _compute_plan(start, kv_len, attention_mask, position_ids, cache_position, B, L)
    if holder is not None:
        holder.__dict__["_fastattn_step"] = (key, plan)
    return plan


def _compute_plan(start, kv_len, attention_mask, position_ids, cache_position, B, L):
    if start is None:  # static cache: the step writes at cache_position, the same for every row
        if cache_position.dim() != 1 or cache_position.numel() != L:
            return None
        start = int(cache_position[0])
        if start < 1 or start + L > kv_len or not torch.equal(
                cache_position, torch.arange(start, start + L, device=cache_position.device)):
            return None
    if start < 1:
        return None  # an empty cache: prefill
    device = cache_position.device if cache_position is not None else attention_mask.device
    seqlens = torch.full((B,), start, dtype=torch.int32, device=device)
    leftpad = None
    if attention_mask is not None:
        layout = _cache_layout(attention_mask, B, L, kv_len)
        if layout is None or not layout[2]:
            return None
        end, first, _ = layout
        if not bool((end == start + L).all()):
            return None  # the mask says the new tokens go elsewhere
        if bool((first > 0).any()):
            leftpad = first
    # the rotary positions the kernel uses: seqlens - leftpad + i; transformers' position_ids
    # must say the same
    if position_ids is not None:
        lp = leftpad if leftpad is not None else torch.zeros_like(seqlens)
        expect = (seqlens - lp)[:, None].long() + torch.arange(L, device=device)
        if position_ids.shape[-1] != L or not torch.equal(position_ids.expand(B, L), expect):
            return None
    return seqlens, leftpad


def _traced_plan(cache_layer, attention_mask, position_ids, cache_position, B: int, L: int):
    """_step_plan under torch.compile, for a static cache: (cache_seqlens, cache_leftpad) read
    off the mask with tensor ops (no host synchronisation, no data-dependent branch). That the
    mask, cache_position and position_ids describe left padding + the causal diagonal with the
    new tokens at cache_position, which the eager plan checks on the host, is asserted in the
    graph (torch._assert_async): a step that does not fit raises instead of falling back."""
    from transformers.cache_utils import StaticLayer

    mask = attention_mask
    if (type(cache_layer) is not StaticLayer or not cache_layer.is_initialized
            or cache_position is None or cache_position.dim() != 1
            or cache_position.shape[0] != L or mask is None
            or not _mask_fits(mask, B, L, cache_layer.max_cache_len)):
        return None
    m, first, end, _, causal = _mask_ranges(mask, B, L, cache_layer.max_cache_len)
    i = torch.arange(L, device=mask.device)
    ok = ((m == causal).all() & (end == cache_position[-1] + 1).all()
          & (cache_position == cache_position[0] + i).all())
    if position_ids is not None:
        expect = (end - L - first)[:, None] + i
        ok = ok & (position_ids.expand(B, L) == expect).all()
    torch._assert_async(ok, "fastattn: a compiled decoding step whose attention mask, "
                            "cache_position or position_ids are not left padding + the causal "
                            "diagonal at cache_position (what the fused KV-cache kernel computes)")
    return (end - L).to(torch.int32), first.to(torch.int32)


def _dynamic_buffers(layer, B, Hkv, D, L, dtype, device):
    """The preallocated (k, v) buffers behind a DynamicLayer, holding its current keys/values at
    [:, :, :S]; reallocated (doubling) when a step would not fit or the layer's tensors were
    replaced (reorder, batch selection, ...)."""
    keys, values = layer.keys, layer.values
    S = keys.shape[2]
    buf = layer.__dict__.get("_fastattn_buffers")
    if buf is not None:
        kb, vb = buf
        if (keys.data_ptr() == kb.data_ptr() and values.data_ptr() == vb.data_ptr()
                and keys.stride() == kb.stride() and values.stride() == vb.stride()
                and kb.shape[0] == B and S + L <= kb.shape[2]
                and kb.dtype == dtype and kb.device == device):
            return kb, vb
    capacity = max(256, 2 * (S + L))
    kb = torch.empty(B, Hkv, capacity, D, dtype=dtype, device=device)
    vb = torch.empty(B, Hkv, capacity, values.shape[3], dtype=dtype, device=device)
    kb[:, :, :S].copy_(keys)
    vb[:, :, :S].copy_(values)
    layer.__dict__["_fastattn_buffers"] = (kb, vb)
    return kb, vb


# ---------------------------------------------------------------------------------------------
# the fused layer
# ---------------------------------------------------------------------------------------------
class _Fused:
    """What a fused layer holds besides its modules (not registered: no state_dict entries)."""

    def __init__(self, layer: nn.Module, rotary: tuple | None):
        attn, mlp = layer.self_attn, layer.mlp
        self.qkv = _fused_projection([attn.q_proj, attn.k_proj, attn.v_proj])
        self.gate_up = _fused_projection([mlp.gate_proj, mlp.up_proj])
        self.o_proj = _projection(attn.o_proj)
        self.down_proj = _projection(mlp.down_proj)
        self.head_dim = attn.head_dim
        self.num_heads = attn.q_proj.weight.shape[0] // attn.head_dim
        self.num_kv_heads = attn.k_proj.weight.shape[0] // attn.head_dim
        self.rotary = rotary  # (cos, sin) tables (max_pos, head_dim / 2) float32, or None
        mod = sys.modules[getattr(type(layer), "_fastattn_base", type(layer)).__module__]
        self.apply_rotary = mod.apply_rotary_pos_emb


def _fused_forward(self, hidden_states, attention_mask=None, position_ids=None,
                   past_key_values=None, use_cache=False, cache_position=None,
                   position_embeddings=None, **kwargs):
    base = self._fastattn_base
    fused = self.__dict__.get("_fastattn")
    if (fused is None or torch.is_grad_enabled() or self.training
            or kwargs.get("output_attentions") or "past_key_value" in kwargs):
        return base.forward(self, hidden_states, attention_mask=attention_mask,
                            position_ids=position_ids, past_key_values=past_key_values,
                            use_cache=use_cache, cache_position=cache_position,
                            position_embeddings=position_embeddings, **kwargs)
    import fastattn

    residual = hidden_states
    dtype = hidden_states.dtype
    norm = self.input_layernorm
    if _w8a8_projection(fused.qkv, hidden_states, norm) is not None:
        # (int8 rows, scales) from the norm's kernel, and the dtype of the projection's output
        h = (*norm(hidden_states, quantize="int8"), dtype)
    else:
        h = norm(hidden_states)
    attn = _fused_attention(self, fused, h, attention_mask, position_ids, past_key_values,
                            cache_position, position_embeddings, kwargs)
    post = self.post_attention_layernorm
    gate_up = _w8a8_projection(fused.gate_up, attn, post)
    if gate_up is not None:
        *h, hidden_states = post(attn, residual, quantize="int8")
        up = gate_up.forward_int8(*h, dtype)
    else:
        if isinstance(post, fastattn.nn.RMSNorm):
            h, hidden_states = post(attn, residual)  # norm(attn + residual), attn + residual
        else:
            hidden_states = residual + attn
            h = post(hidden_states)
        up = fused.gate_up(h)
    return hidden_states + fused.down_proj(fastattn.silu_mul(up))


def _w8a8_projection(projection, x: torch.Tensor, norm: nn.Module):
    """The Int8Linear behind a fused projection when it runs W8A8 on x's rows (activations
    "int8" above WEIGHT_ONLY_MAX_M rows) and ``norm`` is fastattn's RMSNorm, which then hands it
    the int8 rows and scales directly (its kernel quantizes the output it normalises); else None."""
    import fastattn
    from fastattn.ops.int8 import WEIGHT_ONLY_MAX_M

    module = getattr(projection, "__self__", None)
    if (type(module) is not fastattn.nn.Int8Linear or module.activations != "int8"
            or type(norm) is not fastattn.nn.RMSNorm or norm.residual_in_fp32):
        return None
    rows = x.numel() // max(1, x.shape[-1])
    return module if rows > WEIGHT_ONLY_MAX_M.get(x.device.type, 0) else None


def _fused_attention(layer, fused, h, attention_mask, position_ids, past_key_values,
                     cache_position, position_embeddings, kwargs):
    import fastattn

    attn = layer.self_attn
    if isinstance(h, tuple):  # (int8 rows, scales, dtype): the W8A8 GEMM takes them as they are
        qkv = fused.qkv.__self__.forward_int8(*h)
    else:
        qkv = fused.qkv(h)  # (B, L, (H + 2 Hkv) D)
    B, L, _ = qkv.shape
    H, Hkv, D = fused.num_heads, fused.num_kv_heads, fused.head_dim
    q, k, v = qkv.split((H * D, Hkv * D, Hkv * D), dim=-1)
    q = q.view(B, L, H, D).transpose(1, 2)  # (B, H, L, D)
    k = k.view(B, L, Hkv, D).transpose(1, 2)  # (B, Hkv, L, D)
    v = v.view(B, L, Hkv, D).transpose(1, 2)
    sliding = getattr(attn, "sliding_window", None)
    layer_idx = attn.layer_idx
    if (fused.rotary is not None and past_key_values is not None and 0 < L <= DECODE_MAX_QUERIES
            and sliding is None and len(getattr(past_key_values, "layers", ())) > layer_idx):
        cache_layer = past_key_values.layers[layer_idx]
        if torch.compiler.is_compiling():
            # the step plan's host checks would break the graph: a static cache's step is
            # planned from the mask with tensor ops and checked by an in-graph assertion
            plan = _traced_plan(cache_layer, attention_mask, position_ids, cache_position, B, L)
        else:
            plan = _step_plan(cache_layer, attention_mask, position_ids, cache_position, B, L)
        if plan is not None:
            seqlens, leftpad = plan
            dynamic = not hasattr(cache_layer, "max_cache_len")
            if dynamic:
                kc, vc = _dynamic_buffers(cache_layer, B, Hkv, D, L, qkv.dtype, qkv.device)
            else:
                kc, vc = cache_layer.keys, cache_layer.values
            if kc.shape[0] == B and kc.dtype == q.dtype:
                cos, sin = fused.rotary
                out = fastattn.attention_with_kvcache(
                    q, kc, vc, seqlens, k, v, scale=attn.scaling, causal=True,
                    cache_leftpad=leftpad, rotary_cos=cos, rotary_sin=sin)  # (B, H, L, D)
                if dynamic:
                    S = cache_layer.keys.shape[2] + L
                    cache_layer.keys, cache_layer.values = kc[:, :, :S], vc[:, :, :S]
                out = out.transpose(1, 2).reshape(B, L, H * D)
                return fused.o_proj(out)
    # transformers' own attention path, on the fused projections
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    cos, sin = position_embeddings
    q, k = fused.apply_rotary(q, k, cos, sin)
    if past_key_values is not None:
        k, v = past_key_values.update(
            k, v, layer_idx, {"sin": sin, "cos": cos, "cache_position": cache_position})
    impl = attn.config._attn_implementation
    interface = ALL_ATTENTION_FUNCTIONS[impl] if impl != "eager" else _eager(attn)
    # the window transformers' own attention module passes: its attribute (Qwen2: per layer), else
    # the config's (Mistral); the mask holds it too, except for a packed batch (no mask)
    window = sliding if hasattr(attn, "sliding_window") else getattr(attn.config, "sliding_window",
                                                                     None)
    extra = {"sliding_window": window} if window is not None else {}
    # position_ids reach the attention function as in transformers' own attention module (a
    # packed batch is read from them)
    out, _ = interface(attn, q, k, v, attention_mask, dropout=0.0, scaling=attn.scaling,
                       position_ids=position_ids, **extra, **kwargs)
    return fused.o_proj(out.reshape(B, L, H * D))


def _eager(attn):
    return sys.modules[type(attn).__module__].eager_attention_forward


def _fused_apply(self, fn, recurse=True):
    # .to()/.half()/... give the projections new tensors: fuse again from them
    out = self._fastattn_base._apply(self, fn, recurse)
    fused = self.__dict__.get("_fastattn")
    if fused is not None:
        self.__dict__["_fastattn"] = _Fused(self, _rotary_like(fused.rotary, self))
    return out


def _rotary_like(rotary, layer):
    if rotary is None:
        return None
    dev = layer.self_attn.q_proj.weight.device
    return tuple(t.to(dev) for t in rotary)


def _rebuild_fused(base: type, state: dict, rotary) -> nn.Module:
    cls = _fused_class(base)
    obj = cls.__new__(cls)
    obj.__setstate__(state)
    obj.__dict__["_fastattn"] = _Fused(obj, rotary)
    return obj


def _reduce_fused(self, protocol):
    # pickle/deepcopy rebuild the generated class from its base (which pickles by name) and fuse
    # the copy's own projections again (the fused functions are not copied: they would keep
    # computing with this layer's tensors)
    state = {k: v for k, v in self.__dict__.items() if k != "_fastattn"}
    return _rebuild_fused, (self._fastattn_base, state, self.__dict__["_fastattn"].rotary)


@functools.cache
def _fused_class(base: type) -> type:
    return type(base.__name__.replace("DecoderLayer", "FastattnDecoderLayer"), (base,), {
        "forward": _fused_forward, "_apply": _fused_apply, "__reduce_ex__": _reduce_fused,
        "_fastattn_base": base, "__module__": __name__,
        "__doc__": f"{base.__name__} whose inference forward runs fastattn's fused kernels.",
    })


def _reload_hook(module, incompatible_keys):
    # load_state_dict(assign=True) replaces the projections' tensors (and, in a layer built
    # without weights, gives them their device): fuse again
    fused = module.__dict__.get("_fastattn")
    if fused is not None and not module.self_attn.q_proj.weight.is_meta:
        module.__dict__["_fastattn"] = _Fused(module, _rotary_like(fused.rotary, module))


# ---------------------------------------------------------------------------------------------
# conversion
# ---------------------------------------------------------------------------------------------
def _rotary_tables(model: nn.Module, head_dim: int):
    """(cos, sin) float32 (max_pos, head_dim / 2) from the model's rotary embedding module, or
    None when its frequencies are not fixed or it rotates a part of the head only."""
    rope = None
    for m in model.modules():
        if type(m).__name__.endswith("RotaryEmbedding") and hasattr(m, "inv_freq"):
            rope = m
            break
    if rope is None or getattr(rope, "rope_type", "default") not in _STATIC_ROPE:
        return None
    inv_freq = rope.inv_freq.detach().float()
    if inv_freq.numel() * 2 != head_dim:
        return None
    max_pos = int(getattr(rope, "original_max_seq_len", 0) or rope.max_seq_len_cached)
    pos = torch.arange(max_pos, dtype=torch.float32, device=inv_freq.device)
    freqs = torch.outer(pos, inv_freq)  # (max_pos, head_dim / 2), as transformers computes them
    scaling = float(getattr(rope, "attention_scaling", 1.0))
    return (freqs.cos() * scaling).contiguous(), (freqs.sin() * scaling).contiguous()


def _why_not(layer: nn.Module) -> str | None:
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    names = ("q_proj", "k_proj", "v_proj", "o_proj")
    if attn is None or mlp is None or not all(hasattr(attn, n) for n in names):
        return "not the Llama layer structure"
    if set(attn._modules) != set(names) or set(mlp._modules) - {"gate_proj", "up_proj",
                                                                  "down_proj", "act_fn"}:
        return "extra modules in its attention or MLP"
    act = getattr(mlp, "act_fn", None)
    if not (isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"):
        return f"MLP activation {type(act).__name__} is not SiLU"
    if not _fusable([attn.q_proj, attn.k_proj, attn.v_proj]):
        return "q/k/v projections differ in type, dtype or bias"
    if not _fusable([mlp.gate_proj, mlp.up_proj]):
        return "gate/up projections differ in type, dtype or bias"
    return None


def fusable_layers(model: nn.Module, families, why_not, allowed, kept: list):
    """(fqn, layer) for each module of ``model`` whose class name is in ``families``, not fused
    yet, that ``why_not(layer)`` (a reason or None) accepts and ``allowed(layer, fqn)`` allows;
    the refused ones are appended to ``kept`` as (fqn, why). Shared by the fused decoder and
    encoder layers."""
    for fqn, layer in model.named_modules():
        if type(layer).__name__ not in families or "_fastattn" in layer.__dict__:
            continue
        why = why_not(layer)
        if why is not None:
            kept.append((fqn, why))
        elif allowed(layer, fqn):
            yield fqn, layer


def fuse_decoder_layers(model: nn.Module, allowed) -> tuple[list[str], list[tuple[str, str]]]:
    """Fuses every decoder layer of ``model`` whose class is in FUSED_FAMILIES and whose
    ``allowed(module, fqn)`` is True. Returns (fused fqns, [(fqn, why kept)])."""
    fused_fqns, kept = [], []
    tables: dict = {}
    for fqn, layer in list(fusable_layers(model, FUSED_FAMILIES, _why_not, allowed, kept)):
        base = type(layer)
        head_dim = layer.self_attn.head_dim
        if head_dim not in tables:
            tables[head_dim] = _rotary_tables(model, head_dim)
        rotary = tables[head_dim]
        device = layer.self_attn.q_proj.weight.device
        if rotary is not None and device.type != "meta":
            # (a layer built without weights keeps the tables where the rotary frequencies are;
            # loading its weights moves them to the weights' device)
            rotary = tuple(t.to(device) for t in rotary)
        layer.__class__ = _fused_class(base)
        layer.__dict__["_fastattn"] = _Fused(layer, rotary)
        layer.register_load_state_dict_post_hook(_reload_hook)
        fused_fqns.append(fqn)
    return fused_fqns, kept
