"""Hugging Face ``transformers`` integration: ``attn_implementation="fastattn"``.

    from fastattn.integrations.transformers import register
    register()
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="fastattn")
    # or, on a loaded model (also replaces its LayerNorm/RMSNorm): model = fastattn.convert(model)

``register()`` adds "fastattn" to ``transformers.AttentionInterface`` (the attention function) and
to ``transformers.masking_utils.AttentionMaskInterface`` (the mask builder: transformers' own SDPA
mask, a bool (B, 1, Lq, S) mask with True = attend, or None when the causal flag suffices; without a
mask builder transformers passes ``attention_mask=None`` and silently drops causal and padding masks).

Padding-free batches (``DataCollatorWithFlattening``): a batch of one row holding several
sequences back to back, told apart by ``position_ids`` that restart (a new sequence wherever the
next position is not the previous plus one, as transformers' masks read them) or by the
``cu_seq_lens_q/k`` and ``max_length_q/k`` keywords (``FlashAttentionKwargs``), runs
``fastattn.attention_varlen`` on the packed rows. No (L, L) mask is built: for one unpadded row
with no cache content before it the mask builder returns None whenever transformers' mask is the
causal one (with a sliding window, and the packed sequences' blocks, or not), and the attention
function applies the diagonal, the window and the sequences itself. As transformers' flash
attention, the row is read as packed from ``position_ids`` with or without a cache (transformers'
eager and sdpa masks read the packing only without one: pass ``use_cache=False`` to compare).

Decoding: a step of up to ``DECODE_MAX_QUERIES`` new queries against transformers' KV cache (in
inference, without dropout) runs ``fastattn.attention_with_kvcache`` when there is no mask or
when the mask gives each sequence one range of the cache: left padding becomes
``cache_leftpad``, a static cache's empty tail ``cache_seqlens``. The mask is checked exactly
(once per step); any other mask runs ``fastattn.scaled_dot_product_attention`` with it.

Models that do not go through ``AttentionInterface`` (checked with transformers 4.57):
BERT-style models call ``F.scaled_dot_product_attention`` from their own ``*SdpaSelfAttention``
classes: ``fastattn.convert`` routes exactly that call to fastattn inside those modules (a
TorchFunctionMode entered around their forward; the rest of their forward is unchanged). T5's
attention is explicit matmuls: ``fastattn.convert`` swaps ``T5Attention`` for
``FastattnT5Attention``, which adds the relative position bias (+ mask) as an additive float mask.
BLOOM's and MPT's attention are explicit matmuls with an ALiBi bias tensor (both accept
``attn_implementation="fastattn"`` at load time and ignore it): ``fastattn.convert``
swaps ``BloomAttention`` / ``MptAttention`` for ``FastattnBloomAttention`` /
``FastattnMptAttention``, which run ``fastattn_attention_forward`` (so decoding steps take the
KV-cache kernel) with the model's ALiBi slopes as ``alibi_slopes``: both biases
(BLOOM: slope * key position, MPT: slope * (key - last key)) differ from fastattn's
-slope * |query - key| by a constant per query row, which the softmax cancels. Falcon raises
KeyError for ``attn_implementation="fastattn"`` (its attention classes are a fixed table); loaded
with "sdpa", its ``F.scaled_dot_product_attention`` calls (rotary, or ALiBi folded into the float
mask, rounded to bfloat16 by the model) are routed to fastattn by ``fastattn.convert``.
"""

from __future__ import annotations

import functools
import inspect
import logging
import sys

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface, masking_utils
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, sdpa_mask
from transformers.models.bloom import modeling_bloom
from transformers.models.bloom.modeling_bloom import BloomAttention, dropout_add
from transformers.models.falcon.modeling_falcon import FalconAttention
from transformers.models.mpt.modeling_mpt import MptAttention
from transformers.models.t5.modeling_t5 import EncoderDecoderCache, T5Attention

log = logging.getLogger("fastattn")

NAME = "fastattn"

__all__ = ["FastattnBloomAttention", "FastattnMptAttention", "FastattnT5Attention",
           "fastattn_attention_forward", "fastattn_mask", "register"]


@functools.cache
def _warn_once(msg: str) -> None:
    log.warning(msg)


def fastattn_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The ``AttentionInterface`` function registered as "fastattn".

    Args:
        module: the calling attention module (``is_causal``, ``num_key_value_groups`` are read).
        query: (B, H, Lq, D); key, value: (B, Hkv, S, D), H % Hkv == 0 (GQA runs without
            repeating k/v). During cached decoding S counts the cache plus the new tokens.
        attention_mask: None, or bool (True = attend) / additive float, broadcastable to
            (B, H, Lq, S) (longer masks are cut to S, as transformers' sdpa does).
        scaling: softmax scale (default 1/sqrt(D)); dropout: dropout probability.
        kwargs: ``position_ids`` (1, L) and ``cu_seq_lens_q/k``, ``max_length_q/k``: a packed
            batch (see the module docstring), ``is_causal`` (default: the module's flag when
            there is no mask and Lq > 1),
            ``sliding_window`` (query i sees keys i - sliding_window < j <= i), ``softcap``
            (Gemma-2's ``attn_logit_softcapping``: the scaled scores become
            softcap * tanh(score / softcap)), ``s_aux`` (gpt-oss's attention sinks, (H,): one
            logit per head in the softmax denominator; it receives its gradient). Unsupported and
            refused: ``head_mask``.

    Without a mask, the causal diagonal is aligned bottom-right: the Lq queries are the last Lq
    positions of the S keys, which is what a KV cache holds. Decoding steps (0 < Lq <= 16,
    Lq < S) run the KV-cache kernel; see the module docstring.

    Returns:
        (attn_output (B, Lq, H, D) contiguous, None): no attention weights, as sdpa.
    """
    import fastattn

    for name in ("head_mask",):
        if kwargs.get(name) is not None:
            raise NotImplementedError(
                f"attn_implementation='fastattn' does not support {name}; load the model with "
                "attn_implementation='eager' for it")
    if kwargs.get("output_attentions", False):
        _warn_once("attn_implementation='fastattn' returns no attention weights "
                   "(output_attentions=True gives None); use attn_implementation='eager' for them")
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = query.shape[2] > 1 and attention_mask is None and getattr(module, "is_causal", True)
    sliding_window = kwargs.get("sliding_window")
    # score modifiers: fastattn's softcap / sinks keywords (sinks are float32 (H,); the cast
    # keeps the parameter's gradient)
    mods = {}
    if kwargs.get("softcap") is not None:
        mods["softcap"] = float(kwargs["softcap"])
    if kwargs.get("s_aux") is not None:
        mods["sinks"] = kwargs["s_aux"].to(torch.float32)
    if kwargs.get("alibi_slopes") is not None:
        mods["alibi_slopes"] = kwargs["alibi_slopes"]
    packed = None
    if attention_mask is None and query.shape[0] == 1 and query.shape[2] == key.shape[2]:
        packed = _packed_sequences(kwargs)
    if packed is not None:
        cu_seqlens, max_seqlen = packed
        # (1, H, L, D) -> (L, H, D): the packed rows
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
        window = None if sliding_window is None else (int(sliding_window) - 1, -1)
        out = fastattn.attention_varlen(
            q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p=float(dropout),
            is_causal=bool(is_causal), scale=scaling, window=window, **mods)
        return out.unsqueeze(0), None  # (L, H, D) -> (1, L, H, D)
    # (with a mask, the mask holds the window and _cache_layout reads it exactly)
    if _decoding_step(query, key, value, dropout,
                      sliding_window if attention_mask is None else None):
        # a step of a few new queries against the cache: the split-K decoding kernel reads the
        # cache once for all the query heads of a kv head. Without a mask every sequence holds
        # all S keys; with one, it must say where each sequence starts and ends in the cache.
        B, S = query.shape[0], key.shape[2]
        layout = (None if attention_mask is None
                  else _cache_layout(attention_mask, B, query.shape[2], S))
        if attention_mask is None or layout is not None:
            if layout is None:
                seqlens = torch.full((B,), S, dtype=torch.int32, device=query.device)
                leftpad, causal = None, bool(is_causal)
            else:
                seqlens, leftpad, causal = layout
            out = fastattn.attention_with_kvcache(query, key, value, seqlens, scale=scaling,
                                                  causal=causal, cache_leftpad=leftpad, **mods)
            return out.transpose(1, 2).contiguous(), None
    if attention_mask is not None:
        if attention_mask.ndim == 4:
            attention_mask = attention_mask[:, :, :, : key.shape[-2]]
        if attention_mask.dtype != torch.bool and attention_mask.dtype != query.dtype:
            attention_mask = attention_mask.to(query.dtype)
    window = None
    if sliding_window is not None and attention_mask is None:
        # a mask, when given, already holds the window (in the cache's own positions, which a
        # static cache does not align bottom-right); without one the kernel applies it
        window = (int(sliding_window) - 1, -1)
    out = fastattn.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=float(dropout),
        is_causal=bool(is_causal), scale=scaling, enable_gqa=query.shape[1] != key.shape[1],
        window=window, causal_alignment="bottom_right", **mods)
    return out.transpose(1, 2).contiguous(), None  # (B, H, Lq, D) -> (B, Lq, H, D)


# queries per step up to which a step against a cache runs on the decoding kernel (speculative
# decoding verifies a few tokens at once); longer chunks are prefill, for the attention kernel
DECODE_MAX_QUERIES = 16


def _decoding_step(query, key, value, dropout, sliding_window) -> bool:
    """Whether this call can be an inference step of a few new queries against a longer cache
    for ``attention_with_kvcache``: no window inside the cache, no dropout, no gradient, not
    under torch.compile (the decoding op checks its lengths on the host for CPU tensors)."""
    Lq, S = query.shape[2], key.shape[2]
    return (0 < Lq < S and Lq <= DECODE_MAX_QUERIES
            and not dropout
            and (sliding_window is None or int(sliding_window) >= S)
            and key.dtype == query.dtype and value.dtype == query.dtype
            and not torch.compiler.is_compiling()
            and not (torch.is_grad_enabled()
                     and (query.requires_grad or key.requires_grad or value.requires_grad)))


def _mask_fits(mask: torch.Tensor, B: int, Lq: int, S: int) -> bool:
    """A bool (B or 1, 1, Lq, >= S) mask: the shape _mask_ranges reads."""
    return (mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[1] == 1
            and mask.shape[2] == Lq and mask.shape[3] >= S and mask.shape[0] in (1, B))


def _mask_ranges(mask: torch.Tensor, B: int, Lq: int, S: int):
    """Tensor ops only (no host synchronisation: torch.compile traces them) on a mask that
    _mask_fits: (m, first, end, inside, causal). m (B, Lq, S) is the mask's first S keys; row b's
    sequence is keys [first[b], end[b]) as its last query sees them; inside (B, 1, S) the keys from
    first[b] on; causal (B, Lq, S) the mask a decoding step of those sequences would have (the Lq
    queries the last positions, bottom-right)."""
    m = mask[:, 0, :, :S].expand(B, Lq, S)
    last = m[:, -1].to(torch.int8)  # the last query sees the whole sequence
    seen = last.any(-1)
    first = torch.where(seen, last.argmax(-1), 0)
    end = torch.where(seen, S - last.flip(-1).argmax(-1), 0)
    j = torch.arange(S, device=mask.device)
    i = torch.arange(Lq, device=mask.device)
    inside = j >= first[:, None, None]
    causal = inside & (j <= (end[:, None] - Lq + i)[:, :, None])
    return m, first, end, inside, causal


def _cache_layout(mask: torch.Tensor, B: int, Lq: int, S: int):
    """(cache_seqlens, cache_leftpad, causal) when ``mask`` (bool, (B or 1, 1, Lq, >= S), True =
    attend) is exactly what a decoding step of sequences held in cache positions [lp_b, end_b)
    looks like: left padding before lp_b, empty static-cache slots from end_b, the Lq queries the
    last positions (causal, bottom-right, or all seeing the whole sequence). Else None.

    Every layer of a step gets the same mask object: the answer is kept on it, so the check (one
    host synchronisation) runs once per step."""
    memo = mask.__dict__.get("_fastattn_layout")
    if memo is not None and memo[0] == (mask._version, B, Lq, S):
        return memo[1]
    layout = None
    if _mask_fits(mask, B, Lq, S):
        m, first, end, inside, causal = _mask_ranges(mask, B, Lq, S)
        j = torch.arange(S, device=mask.device)
        if torch.equal(m, causal):
            layout = (end.to(torch.int32), first.to(torch.int32), True)
        elif torch.equal(m, (inside & (j < end[:, None, None])).expand(B, Lq, S)):
            layout = (end.to(torch.int32), first.to(torch.int32), False)
    mask.__dict__["_fastattn_layout"] = ((mask._version, B, Lq, S), layout)
    return layout


# ---------------------------------------------------------------------------------------------
# padding-free (packed) batches
# ---------------------------------------------------------------------------------------------
def _packed_sequences(kwargs: dict):
    """(cu_seqlens int32 (n + 1,), max_seqlen) of a batch of one row holding n >= 2 sequences,
    from the ``cu_seq_lens_q/k`` and ``max_length_q/k`` keywords when all are given, else from
    ``position_ids``; None when the row is one sequence or there is nothing to read it from."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    max_q, max_k = kwargs.get("max_length_q"), kwargs.get("max_length_k")
    if cu_q is not None and cu_k is not None and max_q is not None and max_k is not None:
        if (cu_k is not cu_q and not torch.compiler.is_compiling()
                and not torch.equal(cu_k, cu_q)):
            raise NotImplementedError(
                "attn_implementation='fastattn': a packed batch with cu_seq_lens_k != "
                "cu_seq_lens_q (queries and keys from different packings) is not supported")
        return cu_q.to(torch.int32), int(max_q)
    if torch.compiler.is_compiling():
        # reading position_ids synchronises with the host; under torch.compile the mask builder
        # always builds transformers' mask (the packed blocks included), so this is not reached
        # with a packed row
        return None
    position_ids = kwargs.get("position_ids")
    if position_ids is None or position_ids.dim() not in (1, 2):
        return None
    if position_ids.dim() == 2 and position_ids.shape[0] != 1:
        return None
    return _packing_of(position_ids)


def _packing_of(position_ids: torch.Tensor):
    """The sequences of one row of positions: a new one starts wherever a position is not the
    previous one plus one (transformers' ``find_packed_sequence_indices``, which the eager and
    sdpa masks of a packed batch are built from). Every layer of a forward gets the same
    ``position_ids`` tensor: the answer (one host synchronisation) is kept on it."""
    memo = position_ids.__dict__.get("_fastattn_packing")
    if memo is not None and memo[0] == position_ids._version:
        return memo[1]
    pos = position_ids.reshape(-1)
    L = pos.shape[0]
    starts = (torch.diff(pos) != 1).nonzero().reshape(-1) + 1
    packing = None
    if starts.numel() > 0:
        bounds = [0, *starts.tolist(), L]
        cu_seqlens = torch.tensor(bounds, dtype=torch.int32, device=pos.device)
        max_seqlen = max(b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True))
        packing = (cu_seqlens, max_seqlen)
    position_ids.__dict__["_fastattn_packing"] = (position_ids._version, packing)
    return packing


def _mask_parts(fn) -> list | None:
    """The mask functions that ``fn`` is the intersection of (``and_masks`` unrolled), or None
    when it is built some other way."""
    if getattr(fn, "__module__", None) != masking_utils.__name__:
        return None
    if fn.__qualname__ == "and_masks.<locals>.and_mask":
        parts = []
        for f in inspect.getclosurevars(fn).nonlocals.get("mask_functions", ()):
            sub = _mask_parts(f)
            if sub is None:
                return None
            parts += sub
        return parts
    return [fn]


_CAUSAL = "causal_mask_function"
# what the attention function applies without a mask: the causal diagonal, the sliding window
# (its ``sliding_window`` keyword) and the sequences of a packed row (its ``position_ids``)
_MASK_FREE_PARTS = {_CAUSAL, "sliding_window_overlay.<locals>.inner_mask",
                    "packed_sequence_mask_function.<locals>.inner_mask"}


def _needs_no_mask(batch_size, cache_position, kv_length, kv_offset, mask_function,
                   attention_mask) -> bool:
    """Whether transformers asks for the mask of one row without padding whose queries are all
    its keys (no cache content before them) and whose mask is the causal one, with a sliding
    window and/or the packed sequences of a padding-free batch: the attention function applies
    all of it from its keywords (``is_causal``, ``sliding_window``, ``position_ids``)."""
    if (attention_mask is not None or batch_size != 1 or kv_offset != 0
            or cache_position.shape[0] != kv_length or torch.compiler.is_compiling()):
        return False
    if mask_function is causal_mask_function:
        return True
    parts = _mask_parts(mask_function)
    if parts is None:
        return False
    names = {f.__qualname__ for f in parts}
    return _CAUSAL in names and names <= _MASK_FREE_PARTS


def fastattn_mask(batch_size, cache_position, kv_length, kv_offset=0,
                  mask_function=causal_mask_function, attention_mask=None, **kwargs):
    """The ``AttentionMaskInterface`` function registered as "fastattn": transformers' sdpa mask
    (bool, True = attend, or None when the causal flag suffices), and None for one unpadded row
    of causal attention (``_needs_no_mask``): a padding-free packed batch among them, whose
    sequences the attention function reads from ``position_ids`` to run ``attention_varlen``."""
    if _needs_no_mask(batch_size, cache_position, kv_length, kv_offset, mask_function,
                      attention_mask):
        return None
    return sdpa_mask(batch_size=batch_size, cache_position=cache_position, kv_length=kv_length,
                     kv_offset=kv_offset, mask_function=mask_function,
                     attention_mask=attention_mask, **kwargs)


def register(name: str = NAME) -> None:
    """Make ``attn_implementation=name`` ("fastattn") available to every transformers model that
    uses ``AttentionInterface``. Idempotent."""
    AttentionInterface.register(name, fastattn_attention_forward)
    AttentionMaskInterface.register(name, fastattn_mask)


# ---------------------------------------------------------------------------------------------
# models that do not use AttentionInterface
# ---------------------------------------------------------------------------------------------
class _SDPAToFastattn(torch.overrides.TorchFunctionMode):
    """Inside it, F.scaled_dot_product_attention is fastattn.scaled_dot_product_attention (same
    signature and semantics); every other call is unchanged."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            import fastattn

            query, key = args[0], (args[1] if len(args) > 1 else kwargs.get("key"))
            if (key is not None and key.dim() == 4 and key.shape[1] == 1 < query.shape[1]
                    and len(args) < 8 and not kwargs.get("enable_gqa")):
                # one k/v head broadcast over the query heads (multi-query attention, Falcon):
                # exactly grouped-query attention with one group
                kwargs = {**kwargs, "enable_gqa": True}
            return fastattn.scaled_dot_product_attention(*args, **kwargs)
        return func(*args, **kwargs)


def _sdpa_routed_forward(self, *args, **kwargs):
    with _SDPAToFastattn():
        return self._fastattn_base.forward(self, *args, **kwargs)


def _rebuild_sdpa_routed(base: type, state: dict) -> nn.Module:
    obj = _sdpa_routed_class(base).__new__(_sdpa_routed_class(base))
    obj.__setstate__(state)
    return obj


def _reduce_sdpa_routed(self, protocol):
    # pickle/deepcopy rebuild the generated class from its base (which pickles by name)
    return _rebuild_sdpa_routed, (self._fastattn_base, self.__dict__)


@functools.cache
def _sdpa_routed_class(base: type) -> type:
    """Subclass of a transformers ``*Sdpa*Attention`` class whose F.scaled_dot_product_attention
    calls run on fastattn."""
    name = (base.__name__.replace("Sdpa", "Fastattn") if "Sdpa" in base.__name__
            else "Fastattn" + base.__name__)
    return type(name, (base,), {
        "forward": _sdpa_routed_forward, "__reduce_ex__": _reduce_sdpa_routed,
        "_fastattn_base": base, "__module__": __name__,
        "__doc__": f"{base.__name__} with F.scaled_dot_product_attention run by fastattn.",
    })


class FastattnT5Attention(T5Attention):
    """T5Attention whose softmax(q k^T + position_bias + mask) v runs as one fastattn kernel call:
    the relative position bias plus the mask is the additive float mask (it receives its
    gradient), scale 1 (T5 does not scale). Same parameters and outputs as T5Attention; calls with
    output_attentions or layer_head_mask take T5Attention's explicit path (they need the weights).
    """

    def forward(
        self,
        hidden_states,
        mask=None,
        key_value_states=None,
        position_bias=None,
        past_key_values=None,
        layer_head_mask=None,
        query_length=None,
        use_cache=False,
        output_attentions=False,
        cache_position=None,
    ):
        if output_attentions or layer_head_mask is not None:
            return super().forward(hidden_states, mask, key_value_states, position_bias,
                                   past_key_values, layer_head_mask, query_length, use_cache,
                                   output_attentions, cache_position)
        import fastattn

        batch_size, seq_length = hidden_states.shape[:2]
        is_cross_attention = key_value_states is not None
        # (B, L, inner) -> (B, H, L, d_kv)
        query_states = self.q(hidden_states).view(
            batch_size, -1, self.n_heads, self.key_value_proj_dim).transpose(1, 2)

        # cache handling exactly as T5Attention (4.57)
        is_updated = False
        curr_past_key_value = past_key_values
        if isinstance(past_key_values, EncoderDecoderCache):
            is_updated = past_key_values.is_updated.get(self.layer_idx)
            curr_past_key_value = (past_key_values.cross_attention_cache if is_cross_attention
                                   else past_key_values.self_attention_cache)
        current_states = key_value_states if is_cross_attention else hidden_states
        if is_cross_attention and past_key_values is not None and is_updated:
            key_states = curr_past_key_value.layers[self.layer_idx].keys
            value_states = curr_past_key_value.layers[self.layer_idx].values
        else:
            key_states = self.k(current_states).view(
                batch_size, -1, self.n_heads, self.key_value_proj_dim).transpose(1, 2)
            value_states = self.v(current_states).view(
                batch_size, -1, self.n_heads, self.key_value_proj_dim).transpose(1, 2)
            if past_key_values is not None:
                cache_position = cache_position if not is_cross_attention else None
                key_states, value_states = curr_past_key_value.update(
                    key_states, value_states, self.layer_idx, {"cache_position": cache_position})
                if is_cross_attention and isinstance(past_key_values, EncoderDecoderCache):
                    past_key_values.is_updated[self.layer_idx] = True

        if position_bias is None:
            key_length = key_states.shape[-2]
            real_seq_length = query_length if query_length is not None else cache_position[-1] + 1
            if not self.has_relative_attention_bias:
                position_bias = torch.zeros((1, self.n_heads, seq_length, key_length),
                                            device=query_states.device, dtype=query_states.dtype)
                if self.gradient_checkpointing and self.training:
                    position_bias.requires_grad = True
            else:
                position_bias = self.compute_bias(real_seq_length, key_length,
                                                  device=query_states.device,
                                                  cache_position=cache_position)
                position_bias = position_bias[:, :, -seq_length:, :]
            if mask is not None:
                position_bias = position_bias + mask[:, :, :, : key_states.shape[-2]]
        if self.pruned_heads:
            keep = torch.ones(position_bias.shape[1])
            keep[list(self.pruned_heads)] = 0
            bias = position_bias[:, keep.bool()]
        else:
            bias = position_bias

        attn_output = fastattn.scaled_dot_product_attention(
            query_states, key_states, value_states, attn_mask=bias.to(query_states.dtype),
            dropout_p=self.dropout if self.training else 0.0, scale=1.0)
        # (B, H, L, d_kv) -> (B, L, inner)
        attn_output = attn_output.transpose(1, 2).reshape(batch_size, -1, self.inner_dim)
        return self.o(attn_output), position_bias


def _attend_mask(mask, masked_is_true: bool):
    """A transformers mask of BLOOM or MPT as fastattn_attention_forward takes it: bool, True =
    attend (MPT's bool mask says True = masked; BLOOM's float mask holds 0 or the dtype's min),
    so that a decoding step's mask is read as ranges of the cache (_cache_layout). Every layer of
    a step gets the same mask object: the converted mask is kept on it, and so is the layout
    read from it. A float mask with other values stays as it is (additive); under torch.compile
    nothing is read on the host."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        if not masked_is_true:
            return mask
    elif torch.compiler.is_compiling():
        return mask
    memo = mask.__dict__.get("_fastattn_attend")
    if memo is not None and memo[0] == mask._version:
        return memo[1]
    if mask.dtype == torch.bool:
        attend = ~mask
    else:
        attend = mask == 0
        if not bool((attend | (mask == torch.finfo(mask.dtype).min)).all()):
            attend = mask
    mask.__dict__["_fastattn_attend"] = (mask._version, attend)
    return attend


class FastattnBloomAttention(BloomAttention):
    """BloomAttention whose softmax(alibi + q k^T / sqrt(d) + mask) v runs as one fastattn kernel
    call with ``alibi_slopes`` (BLOOM's slopes, float32) through ``fastattn_attention_forward``
    (decoding steps on the KV-cache kernel). Same parameters and outputs as
    BloomAttention (no attention weights); calls with output_attentions, head_mask or
    pretraining_tp > 1 with slow_but_exact take BloomAttention's explicit path."""

    def forward(self, hidden_states, residual, alibi, attention_mask, layer_past=None,
                head_mask=None, use_cache=False, output_attentions=False, cache_position=None):
        if (output_attentions or head_mask is not None
                or (self.pretraining_tp > 1 and self.slow_but_exact)):
            return super().forward(hidden_states, residual, alibi, attention_mask, layer_past,
                                   head_mask, use_cache, output_attentions, cache_position)
        batch_size, q_length, _ = hidden_states.shape
        fused_qkv = self.query_key_value(hidden_states)  # (B, L, 3 * hidden)
        q, k, v = self._reshape(fused_qkv)  # 3 x (B, H, L, D)
        if layer_past is not None:
            k, v = layer_past.update(k, v, self.layer_idx, {"cache_position": cache_position})
        # a prefill runs the attention kernel with the mask, a decoding step the KV-cache kernel
        # (the mask read as each sequence's range of the cache)
        out, _ = fastattn_attention_forward(
            self, q, k, v, _attend_mask(attention_mask, masked_is_true=False),
            scaling=self.inv_norm_factor,
            dropout=self.attention_dropout.p if self.training else 0.0,
            alibi_slopes=_bloom_slopes(self.num_heads, q.device))  # (B, L, H, D)
        out = out.reshape(batch_size, q_length, self.num_heads * self.head_dim)
        out = dropout_add(self.dense(out), residual, self.hidden_dropout, self.training)
        return out, None


@functools.cache
def _bloom_slopes(num_heads: int, device: torch.device) -> torch.Tensor:
    """BLOOM's ALiBi slopes (H,) float32: its bias at key position 1 (slope * 1, exact)."""
    ones = torch.ones(1, 2, device=device)
    return modeling_bloom.build_alibi_tensor(ones, num_heads, torch.float32)[:, 0, 1].contiguous()


class FastattnMptAttention(MptAttention):
    """MptAttention whose softmax(q k^T * softmax_scale + position_bias, masked) v runs as one
    fastattn kernel call with ``alibi_slopes`` read off the model's ALiBi bias (its value one key
    before the last is -slope, exactly) through ``fastattn_attention_forward`` (decoding steps on
    the KV-cache kernel). Same parameters and outputs as MptAttention (no
    attention weights)."""

    def forward(self, hidden_states, position_bias, past_key_values=None, attention_mask=None,
                cache_position=None, **kwargs):
        if kwargs.get("past_key_value") is not None:  # the deprecated name
            past_key_values = kwargs["past_key_value"]
        if position_bias is None or position_bias.dim() != 3 or position_bias.shape[-1] < 2:
            raise NotImplementedError("FastattnMptAttention needs MPT's ALiBi position_bias "
                                      "(H, 1, max_seq_len >= 2)")
        batch_size, seq_length = hidden_states.shape[:2]
        mixed_qkv = self.Wqkv(hidden_states)
        if self.clip_qkv:
            mixed_qkv = mixed_qkv.clamp(min=-self.clip_qkv, max=self.clip_qkv)
        q, k, v = mixed_qkv.chunk(3, dim=2)
        # (B, L, H * D) -> (B, H, L, D)
        q, k, v = (t.reshape(batch_size, seq_length, self.n_heads, self.head_dim).transpose(1, 2)
                   for t in (q, k, v))
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx, {"cache_position": cache_position})
        slopes = -position_bias[:, 0, -2].float()
        out, _ = fastattn_attention_forward(
            self, q, k, v, _attend_mask(attention_mask, masked_is_true=True),
            scaling=self.softmax_scale, dropout=self.attn_dropout_p if self.training else 0.0,
            alibi_slopes=slopes)  # (B, L, H, D)
        out = out.reshape(batch_size, seq_length, -1)  # (B, L, H * D)
        return self.out_proj(out), None


def _eager_with_sdpa_sibling(cls: type) -> str | None:
    """Name of the ``*Sdpa*`` sibling of a legacy eager attention class (BertSelfAttention ->
    BertSdpaSelfAttention), None if it has none."""
    mod = sys.modules.get(cls.__module__)
    name = cls.__name__
    for i in range(1, len(name)):
        sib = getattr(mod, name[:i] + "Sdpa" + name[i:], None)
        if isinstance(sib, type) and issubclass(sib, cls):
            return sib.__name__
    return None


def attention_module_class(module: nn.Module) -> tuple[type | None, str | None]:
    """For ``fastattn.convert``: (the class to give ``module`` so that its attention runs on
    fastattn, or None; why an attention module is kept as it is, or None)."""
    cls = type(module)
    if not cls.__module__.startswith("transformers.models."):
        return None, None
    if cls is T5Attention:
        return FastattnT5Attention, None
    if cls is BloomAttention:
        return FastattnBloomAttention, None
    if cls is MptAttention:
        return FastattnMptAttention, None
    if cls is FalconAttention:
        # one class for eager and sdpa: F.scaled_dot_product_attention (ALiBi in its float
        # mask) only when the model was loaded with attn_implementation="sdpa"
        if module.config._attn_implementation == "sdpa":
            return _sdpa_routed_class(cls), None
        return None, ("FalconAttention calls F.scaled_dot_product_attention only with "
                      "attn_implementation='sdpa'; load the model with it for fastattn.convert "
                      "to route it")
    if "Sdpa" in cls.__name__ and "Attention" in cls.__name__:
        return _sdpa_routed_class(cls), None
    if cls.__name__.endswith("Attention") and (sib := _eager_with_sdpa_sibling(cls)):
        return None, (f"{cls.__name__} is this model's eager attention; load the model with "
                      f"attn_implementation='sdpa' ({sib}) for fastattn.convert to route it")
    return None, None


def use_fastattn(model: nn.Module) -> str | None:
    """For ``fastattn.convert``: set attn_implementation "fastattn" on a PreTrainedModel that
    dispatches through AttentionInterface; returns a note of what changed, or None."""
    register()
    old = model.config._attn_implementation
    if old == NAME:
        return None
    try:
        dynamic = type(model)._can_set_attn_implementation()
    except (OSError, TypeError, AttributeError):
        dynamic = False
    if not dynamic:
        return None  # its attention modules are swapped one by one instead
    model.set_attn_implementation(NAME)
    new = model.config._attn_implementation
    return f"attn_implementation {old!r} -> {new!r}"
