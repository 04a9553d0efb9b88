"""``fastattn.nn.MultiheadAttention``: ``torch.nn.MultiheadAttention`` running on fastattn kernels.

Same constructor, parameters, state_dict keys and forward signature as ``torch.nn.MultiheadAttention``
(it is a subclass); only ``forward`` is reimplemented:

    input projections   one fused (B, L, 3E) matmul for self-attention with a packed in_proj_weight,
                        q + fused kv for encoder-decoder attention (key is value), three otherwise
    masks               key_padding_mask (True/-inf = ignore) and attn_mask (torch polarity: bool
                        True = NOT allowed; float = added; (L, S) or (B * num_heads, L, S)) become
                        one SDPA mask (bool True = attend, or additive float), broadcast, never
                        expanded to (B, H, L, S) unless both masks are given; is_causal is passed
                        to the kernel as a flag
    attention           fastattn.scaled_dot_product_attention on strided (B, H, L, D) views of the
                        projections (no copies), dropout in training mode
    need_weights=True   (torch's default) the explicit path, as in torch: float32 softmax
                        weights (B, H, L, S), dropped out in training, output = weights @ v.
                        Materialising the returned L x S weights already costs the QK^T GEMM, so
                        P @ V is cheaper than a second pass through the kernel, and the output
                        is exactly the one the returned weights produce. Pass need_weights=False
                        for the kernel (nn.TransformerEncoderLayer/DecoderLayer do).

Differences from torch, all on purpose: ``is_causal=True`` without ``attn_mask`` means causal
(torch raises); a query row whose keys are all masked gives zeros (torch gives NaN).

Inside an nn.TransformerEncoderLayer, torch's fused inference path reads ``self_attn``'s weights
and never calls its forward: use ``fastattn.convert(model)``, which swaps the module and turns
that path off, rather than assigning this module to ``layer.self_attn`` by hand.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

import fastattn
from fastattn.ops._backend import check_backend


def _check_inputs(mha: nn.MultiheadAttention, query, key, value, key_padding_mask, attn_mask) -> bool:
    """Raise the errors torch.nn.MultiheadAttention raises (same exception types), naming the
    argument; return whether the input is batched."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.is_nested:
            raise AssertionError(f"fastattn.nn.MultiheadAttention does not take NestedTensor "
                                 f"input ({name} is nested)")
    if query.dim() not in (2, 3):
        raise AssertionError(f"query should be unbatched 2D or batched 3D tensor but received "
                             f"{query.dim()}-D query tensor")
    batched = query.dim() == 3
    if key.dim() != query.dim() or value.dim() != query.dim():
        raise AssertionError(f"For {query.dim()}-D query, expected key and value to be "
                             f"{query.dim()}-D but found {key.dim()}-D and {value.dim()}-D tensors")
    if key_padding_mask is not None:
        want = 2 if batched else 1
        if key_padding_mask.dim() != want:
            raise AssertionError(f"key_padding_mask must be {want}-D for {query.dim()}-D query, "
                                 f"got shape {tuple(key_padding_mask.shape)}")
        if key_padding_mask.dtype != torch.bool and not key_padding_mask.is_floating_point():
            raise AssertionError("only bool and floating types of key_padding_mask are supported")
    if attn_mask is not None:
        if attn_mask.dim() not in (2, 3):
            raise AssertionError(f"attn_mask must be 2-D or 3-D, got shape {tuple(attn_mask.shape)}")
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            raise AssertionError("only bool and floating types of attn_mask are supported")
    if query.shape[-1] != mha.embed_dim:
        raise AssertionError(f"was expecting embedding dimension of {mha.embed_dim} in query, but "
                             f"got query.shape[-1]={query.shape[-1]}")
    if key.shape[-1] != mha.kdim or value.shape[-1] != mha.vdim:
        raise AssertionError(f"key.shape[-1]={key.shape[-1]} and value.shape[-1]="
                             f"{value.shape[-1]} must equal kdim={mha.kdim} and vdim={mha.vdim}")
    if key.shape[:-1] != value.shape[:-1]:
        raise AssertionError(f"key's sequence and batch dims {tuple(key.shape[:-1])} do not match "
                             f"value's {tuple(value.shape[:-1])}")
    return batched


def _check_backend(backend) -> str:
    check_backend(backend)
    return backend


class MultiheadAttention(nn.MultiheadAttention):
    """Drop-in for ``torch.nn.MultiheadAttention`` whose attention runs on fastattn kernels.

    Args: those of ``torch.nn.MultiheadAttention``, plus ``backend`` (keyword only, also settable
    as an attribute): the ``backend=`` passed to ``fastattn.scaled_dot_product_attention``.

    Shapes (batch_first=True; swap the first two dims otherwise; drop B for unbatched input):
        query (B, L, E), key (B, S, kdim), value (B, S, vdim) -> output (B, L, E);
        weights (B, L, S) averaged over heads, or (B, num_heads, L, S).
    """

    def __init__(self, *args, backend: str = "auto", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.backend = _check_backend(backend)

    @classmethod
    def from_module(cls, mha: nn.MultiheadAttention, *, backend: str = "auto") -> MultiheadAttention:
        """A fastattn MultiheadAttention computing what ``mha`` computes.

        The new module takes ``mha``'s parameters themselves (no copy: same device, dtype and
        storage, so optimizers and tied weights keep working), its train/eval mode and hooks.
        ``copy.deepcopy(mha)`` first for an independent module.
        """
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"mha must be a torch.nn.MultiheadAttention, got {type(mha).__name__}")
        new = cls.__new__(cls)
        # Shallow copies of the parameter/buffer/submodule/hook dicts: the tensors and submodules
        # are shared, the containers are not (registering on one must not change the other).
        new.__dict__.update({k: (copy.copy(v) if isinstance(v, dict) else v)
                             for k, v in mha.__dict__.items()})
        new.backend = _check_backend(backend)
        return new

    def __prepare_scriptable__(self):
        # torch.jit.script calls this first: TorchScript is deprecated and cannot compile the
        # kernels' Python dispatch, so say so instead of failing deep inside its compiler
        raise RuntimeError(
            "fastattn.nn.MultiheadAttention cannot be scripted with torch.jit.script: use "
            "torch.compile (the fastattn ops are custom ops it traces), or script the original "
            "torch.nn.MultiheadAttention")

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, backend={self._backend!r}"

    @property
    def _backend(self) -> str:
        # modules unpickled from before the attribute existed
        return getattr(self, "backend", "auto")

    # -----------------------------------------------------------------------------------------
    def _project(self, query, key, value, self_attention: bool, kv_shared: bool):
        """Input projections, token-major: query (B, L, E) -> q (B, L, H, D); k, v (B, S, H, D).

        q, k, v are strided views of the projection outputs (no copies); the attention kernels
        take any strides."""
        H, D, E = self.num_heads, self.head_dim, self.embed_dim
        b = self.in_proj_bias
        if self._qkv_same_embed_dim:
            w = self.in_proj_weight
            if self_attention:
                qkv = F.linear(query, w, b).unflatten(-1, (3, H, D))  # (B, L, 3, H, D)
                return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
            q = self._project_query(query)
            w_kv = w[E:]
            b_kv = None if b is None else b[E:]
            if kv_shared:
                kv = F.linear(key, w_kv, b_kv).unflatten(-1, (2, H, D))  # (B, S, 2, H, D)
                return q, kv[:, :, 0], kv[:, :, 1]
            w_k, w_v = w_kv.chunk(2)
            b_k, b_v = (None, None) if b_kv is None else b_kv.chunk(2)
            k = F.linear(key, w_k, b_k).unflatten(-1, (H, D))
            v = F.linear(value, w_v, b_v).unflatten(-1, (H, D))
            return q, k, v
        _, b_k, b_v = (None, None, None) if b is None else b.chunk(3)
        q = self._project_query(query)
        k = F.linear(key, self.k_proj_weight, b_k).unflatten(-1, (H, D))
        v = F.linear(value, self.v_proj_weight, b_v).unflatten(-1, (H, D))
        return q, k, v

    def _project_query(self, query):
        """The query projection alone: (B, L, E) -> q (B, L, H, D)."""
        E = self.embed_dim
        w = self.in_proj_weight[:E] if self._qkv_same_embed_dim else self.q_proj_weight
        b = None if self.in_proj_bias is None else self.in_proj_bias[:E]
        return F.linear(query, w, b).unflatten(-1, (self.num_heads, self.head_dim))

    def _batch_first(self, query, key, value, key_padding_mask=None, attn_mask=None):
        """Check the inputs as torch does and view them as (B, T, E) (key_padding_mask (B, S));
        returns them and whether the input was batched."""
        batched = _check_inputs(self, query, key, value, key_padding_mask, attn_mask)
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            # (L, B, E) -> (B, L, E) views
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        return query, key, value, key_padding_mask, batched

    def _output(self, out, batched):
        """Attention output (B, H, L, D) -> out_proj, in the caller's layout."""
        B, H, L, D = out.shape
        # token-major rows (a view of the kernels' output), then one out-projection GEMM
        if batched and not self.batch_first:
            out = out.permute(2, 0, 1, 3).reshape(L, B, H * D)  # (L, B, E)
        else:
            out = out.permute(0, 2, 1, 3).reshape(B, L, H * D)  # (B, L, E)
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias)
        return out if batched else out.squeeze(0)

    def _sdpa_mask(self, attn_mask, key_padding_mask, is_causal, B, L, S, extra, dtype, device):
        """torch.nn.MultiheadAttention masks -> (mask for SDPA or None, causal flag).

        The SDPA mask is bool (True = attend) or additive float in ``dtype``, broadcastable to
        (B, H, L, S + extra); ``extra`` keys (bias_k/bias_v, zero attention) are always visible.
        """
        H = self.num_heads
        if attn_mask is not None:
            if attn_mask.dim() == 2:
                if tuple(attn_mask.shape) != (L, S):
                    raise RuntimeError(f"The shape of the 2D attn_mask is {tuple(attn_mask.shape)},"
                                       f" but should be {(L, S)}.")
                attn_mask = attn_mask.view(1, 1, L, S)
            else:
                if tuple(attn_mask.shape) != (B * H, L, S):
                    raise RuntimeError(f"The shape of the 3D attn_mask is {tuple(attn_mask.shape)},"
                                       f" but should be {(B * H, L, S)}.")
                attn_mask = attn_mask.view(B, H, L, S)
        if key_padding_mask is not None:
            if tuple(key_padding_mask.shape) != (B, S):
                raise AssertionError(f"key_padding_mask must have shape (batch, source length) = "
                                     f"{(B, S)}, got {tuple(key_padding_mask.shape)}")
            key_padding_mask = key_padding_mask.view(B, 1, 1, S)

        causal = False
        if is_causal and extra == 0:
            # torch's hint: attn_mask *is* the causal mask, so the kernel's causal flag replaces
            # it (and lets the kernel skip the blocks above the diagonal)
            attn_mask, causal = None, True
        elif is_causal and attn_mask is None:
            # appended keys must stay visible to every query: spell the causal mask out
            attn_mask = ~torch.ones(L, S, dtype=torch.bool, device=device).tril().view(1, 1, L, S)

        masks = []
        for m in (attn_mask, key_padding_mask):
            if m is None:
                continue
            # torch polarity -> SDPA polarity; float masks are additive in both
            m = ~m if m.dtype == torch.bool else m.to(dtype)
            if extra:
                m = F.pad(m, (0, extra), value=True if m.dtype == torch.bool else 0.0)
            masks.append(m)
        if not masks:
            return None, causal
        if len(masks) == 1:
            return masks[0], causal
        a, b = masks
        if a.dtype == torch.bool and b.dtype == torch.bool:
            return a & b, causal
        to_float = lambda m: (m if m.dtype != torch.bool else torch.zeros(
            m.shape, dtype=dtype, device=device).masked_fill_(~m, float("-inf")))
        return to_float(a) + to_float(b), causal

    @staticmethod
    def _weights(q, k, mask, causal, scale):
        """Attention probabilities (B, H, L, S), in float32 (float64 for float64 inputs); rows
        with no visible key are 0, not NaN, in the forward and the backward."""
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        s = torch.matmul(q.to(acc), k.to(acc).transpose(-2, -1)) * scale
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.to(acc)
        if causal:
            L, S = s.shape[-2:]
            upper = torch.ones(L, S, dtype=torch.bool, device=s.device).triu(1)
            s = s.masked_fill(upper, float("-inf"))
        m = s.detach().amax(dim=-1, keepdim=True)
        p = torch.exp(s - torch.where(torch.isinf(m), torch.zeros_like(m), m))
        denom = p.sum(dim=-1, keepdim=True)
        return p / torch.where(denom == 0, torch.ones_like(denom), denom)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """See ``torch.nn.MultiheadAttention.forward``; same arguments, shapes and mask polarity."""
        cache = getattr(self, "_fastattn_kv", None)
        if cache is not None:  # decoding inside fastattn.nn.KVCache (fastattn/nn/decoding.py)
            return cache.forward(self, query, key, value, key_padding_mask, need_weights,
                                 attn_mask, average_attn_weights, is_causal)
        # identities decide the fused projections: take them before any reshape
        self_attention = query is key and key is value
        kv_shared = key is value
        query, key, value, key_padding_mask, batched = self._batch_first(
            query, key, value, key_padding_mask, attn_mask)
        B, L, E = query.shape
        S = key.shape[1]
        if key.shape[0] != B:
            raise AssertionError(f"query batch size {B} != key batch size {key.shape[0]}")
        H, D = self.num_heads, self.head_dim

        q, k, v = self._project(query, key, value, self_attention, kv_shared)
        extra = 0
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.view(1, 1, H, D).expand(B, 1, H, D)], dim=1)
            v = torch.cat([v, self.bias_v.view(1, 1, H, D).expand(B, 1, H, D)], dim=1)
            extra += 1
        elif self.bias_k is not None or self.bias_v is not None:
            raise AssertionError("bias_k and bias_v must be set together")
        if self.add_zero_attn:
            zeros = k.new_zeros(B, 1, H, D)
            k, v = torch.cat([k, zeros], dim=1), torch.cat([v, zeros], dim=1)
            extra += 1
        # (B, T, H, D) -> (B, H, T, D) views
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

        mask, causal = self._sdpa_mask(attn_mask, key_padding_mask, is_causal, B, L, S, extra,
                                       query.dtype, query.device)
        dropout_p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            # the L x S weights are returned, so they are materialised; the output is the one
            # they (dropped out, in training) produce
            weights = self._weights(q, k, mask, causal, D ** -0.5)
            if dropout_p > 0.0:
                weights = F.dropout(weights, p=dropout_p)
            out = torch.matmul(weights.to(v.dtype), v)
        else:
            out = fastattn.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal,
                backend=self._backend)

        out = self._output(out, batched)
        if weights is not None:
            if average_attn_weights:
                weights = weights.mean(dim=1)  # (B, L, S), averaged before rounding
            weights = weights.to(query.dtype)
            if not batched:
                weights = weights.squeeze(0)
        return out, weights
