"""KV-cache decoding for ``nn.TransformerDecoder`` stacks converted by ``fastattn.convert``.

A ``torch.nn.TransformerDecoder`` has no cache: generating token t re-runs the decoder over all
t tokens. Every part of a decoder layer except self-attention works on each position on its own,
so feeding only the new tokens is enough once self-attention remembers the keys and values of
the earlier ones. Inside ``with KVCache(decoder):`` it does:

    decoder = fastattn.convert(nn.TransformerDecoder(layer, num_layers)).eval()
    with torch.no_grad(), fastattn.nn.KVCache(decoder) as cache:
        y = decoder(prompt, memory, tgt_is_causal=True)   # prefill: (B, L, E), causal
        for _ in range(steps):
            y = decoder(next_tokens, memory)               # only the new tokens, (B, 1, E)

* self-attention (``layer.self_attn``) appends each call's keys/values to a cache and attends
  with ``fastattn.attention_with_kvcache`` (the new tokens are the last positions; causal among
  themselves when the call is causal, as a prefill with ``tgt_is_causal=True`` or a causal
  ``tgt_mask`` is);
* encoder-decoder attention (``layer.multihead_attn``) projects ``memory`` once and reuses the
  keys/values while the same, unmodified memory tensor is passed (a new or modified tensor is
  projected again);
* the output of each call equals the last positions of the full-prefix decoder output.

For an ``nn.Transformer``, run ``model.encoder`` once and call ``model.decoder`` per step inside
the cache (calling the whole model re-encodes the source, which then is a new memory).

Decoding with a cache is inference: with gradients required it raises instead of silently
dropping them. Self-attention under a cache takes no ``tgt_key_padding_mask`` and no masks other
than the causal one (padded prompts: decode them in separate batches, or without a cache).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["KVCache"]

_ATTR = "_fastattn_kv"


def _refuse_common(mha, need_weights):
    if need_weights:
        raise NotImplementedError(
            "fastattn.nn.KVCache: need_weights=True is not supported while decoding with a KV "
            "cache (nn.TransformerDecoderLayer passes need_weights=False)")
    if mha.bias_k is not None or mha.add_zero_attn:
        raise NotImplementedError(
            "fastattn.nn.KVCache: add_bias_kv / add_zero_attn are not supported with a KV cache")


def _refuse_grad(t: torch.Tensor):
    if torch.is_grad_enabled() and t.requires_grad:
        raise RuntimeError(
            "fastattn.nn.KVCache: decoding with a KV cache is inference only; run it under "
            "torch.no_grad() or torch.inference_mode() (for training, run the decoder on the "
            "whole sequence without a cache)")


class _SelfAttentionCache:
    """Keys/values of the tokens seen so far, (B, H, capacity, D), grown by doubling."""

    def __init__(self, capacity: int) -> None:
        self.capacity0 = capacity
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.seqlen = 0

    def reset(self) -> None:
        self.k = self.v = None
        self.seqlen = 0

    def reorder(self, index: torch.Tensor) -> None:
        if self.k is not None:
            self.k = self.k.index_select(0, index.to(self.k.device))
            self.v = self.v.index_select(0, index.to(self.v.device))

    def _reserve(self, B: int, H: int, D: int, n_new: int, like: torch.Tensor) -> None:
        if self.k is not None:
            if self.k.shape[0] != B:
                raise ValueError(
                    f"fastattn.nn.KVCache: batch size changed from {self.k.shape[0]} to {B} "
                    f"mid-sequence; call cache.reorder(index) (beam search) or cache.reset()")
            if self.k.dtype != like.dtype or self.k.device != like.device:
                raise ValueError(
                    f"fastattn.nn.KVCache: the cache holds {self.k.dtype} on {self.k.device}, "
                    f"this call computes {like.dtype} on {like.device}; call cache.reset()")
            if self.seqlen + n_new <= self.k.shape[2]:
                return
        need = self.seqlen + n_new
        cap = max(need, self.capacity0, 2 * (0 if self.k is None else self.k.shape[2]))
        k = like.new_empty(B, H, cap, D)
        v = like.new_empty(B, H, cap, D)
        if self.k is not None and self.seqlen:
            k[:, :, : self.seqlen] = self.k[:, :, : self.seqlen]
            v[:, :, : self.seqlen] = self.v[:, :, : self.seqlen]
        self.k, self.v = k, v

    def forward(self, mha, query, key, value, key_padding_mask=None, need_weights=True,
                attn_mask=None, average_attn_weights=True, is_causal=False):
        import fastattn

        if not (query is key and key is value):
            raise ValueError("fastattn.nn.KVCache: this module caches self-attention; it must be "
                             "called with query, key and value the same tensor")
        _refuse_common(mha, need_weights)
        if key_padding_mask is not None:
            raise NotImplementedError(
                "fastattn.nn.KVCache: key_padding_mask (tgt_key_padding_mask) is not supported "
                "in self-attention with a KV cache; decode padded prompts without a cache")
        if attn_mask is not None and not is_causal:
            raise NotImplementedError(
                "fastattn.nn.KVCache: with a KV cache, self-attention takes no attn_mask other "
                "than the causal mask (pass is_causal=True / tgt_is_causal=True with it)")
        query, _, _, _, batched = mha._batch_first(query, query, query)
        B, L, _ = query.shape
        H, D = mha.num_heads, mha.head_dim
        q, k_new, v_new = mha._project(query, query, query, True, True)  # (B, L, H, D) views
        _refuse_grad(q)
        self._reserve(B, H, D, L, q)
        seqlens = torch.full((B,), self.seqlen, dtype=torch.int32, device=q.device)
        out = fastattn.attention_with_kvcache(
            q.transpose(1, 2), self.k, self.v, seqlens, k_new.transpose(1, 2),
            v_new.transpose(1, 2), causal=bool(is_causal), backend=mha._backend)
        self.seqlen += L
        return mha._output(out, batched), None


class _StaticKVCache:
    """Projected keys/values of the encoder output, reused while the same memory is passed."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.source: tuple | None = None
        self.kv: tuple[torch.Tensor, torch.Tensor] | None = None

    def reorder(self, index: torch.Tensor) -> None:
        self.reset()  # the caller passes the reordered memory, which is projected again

    def forward(self, mha, query, key, value, key_padding_mask=None, need_weights=True,
                attn_mask=None, average_attn_weights=True, is_causal=False):
        import fastattn

        _refuse_common(mha, need_weights)
        kv_shared = key is value
        # what identifies the memory: the tensors themselves and their in-place version counters
        source = (key, value, key._version, value._version, tuple(key.shape), tuple(value.shape))
        query, key, value, key_padding_mask, batched = mha._batch_first(
            query, key, value, key_padding_mask, attn_mask)
        B, L, _ = query.shape
        S = key.shape[1]
        if key.shape[0] != B:
            raise AssertionError(f"query batch size {B} != key batch size {key.shape[0]}")
        hit = self.source is not None and all(
            a is b if isinstance(a, torch.Tensor) else a == b
            for a, b in zip(source, self.source, strict=True))
        if hit:  # only the query projection
            q = mha._project_query(query)
            k, v = self.kv
        else:
            q, k, v = mha._project(query, key, value, False, kv_shared)
            self.source, self.kv = source, (k, v)
        _refuse_grad(q)
        mask, causal = mha._sdpa_mask(attn_mask, key_padding_mask, is_causal, B, L, S, 0,
                                      query.dtype, query.device)
        out = fastattn.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
            is_causal=causal, backend=mha._backend)
        return mha._output(out, batched), None


class KVCache:
    """KV-cache decoding for the decoder layers of ``model`` (see the module docstring).

    Args:
        model: an ``nn.TransformerDecoder``, ``nn.TransformerDecoderLayer``, ``nn.Transformer``
            (its decoder layers) or a ``fastattn.nn.MultiheadAttention`` (as self-attention),
            after ``fastattn.convert``.
        capacity: tokens the self-attention caches hold before they grow (by doubling).

    Used as a context manager: the caches are attached on entry and detached (freed) on exit.
    """

    def __init__(self, model: nn.Module, *, capacity: int = 256) -> None:
        from fastattn.nn.attention import MultiheadAttention

        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be a positive int, got {capacity!r}")
        targets: list[tuple[nn.Module, object]] = []
        if isinstance(model, nn.MultiheadAttention):
            targets.append((model, _SelfAttentionCache(capacity)))
        for m in model.modules():
            if isinstance(m, nn.TransformerDecoderLayer):
                targets.append((m.self_attn, _SelfAttentionCache(capacity)))
                targets.append((m.multihead_attn, _StaticKVCache()))
        if not targets:
            raise ValueError("fastattn.nn.KVCache: model has no nn.TransformerDecoderLayer or "
                             "MultiheadAttention to cache")
        for mha, _ in targets:
            if not isinstance(mha, MultiheadAttention):
                raise TypeError(f"fastattn.nn.KVCache: {type(mha).__name__} is not a fastattn "
                                f"MultiheadAttention; run fastattn.convert(model) first")
        self._targets = targets
        self._active = False

    @property
    def seqlen(self) -> int:
        """Tokens held by the self-attention caches."""
        lens = {c.seqlen for _, c in self._targets if isinstance(c, _SelfAttentionCache)}
        return lens.pop() if len(lens) == 1 else max(lens, default=0)

    def reset(self) -> None:
        """Forget every cached token (a new sequence starts)."""
        for _, c in self._targets:
            c.reset()

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows ``index`` (int64 (B',)), as beam search does between steps."""
        if not isinstance(index, torch.Tensor) or index.dim() != 1 or index.dtype != torch.long:
            raise TypeError("index must be a 1-D int64 tensor")
        for _, c in self._targets:
            c.reorder(index)

    def __enter__(self) -> KVCache:
        for mha, _ in self._targets:
            if getattr(mha, _ATTR, None) is not None:
                raise RuntimeError("fastattn.nn.KVCache: a cache is already attached to this model")
        for mha, c in self._targets:
            setattr(mha, _ATTR, c)
        self._active = True
        return self

    def __exit__(self, *exc) -> None:
        for mha, _ in self._targets:
            if _ATTR in mha.__dict__:
                delattr(mha, _ATTR)
        self.reset()
        self._active = False
