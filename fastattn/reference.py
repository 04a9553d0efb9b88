"""Pure-PyTorch ground truth for every fastattn op.

These functions are the oracle of the tests (called on float64 copies on CPU, float32 on GPU),
the baseline of the benchmarks and the last-resort fallback of ``backend="auto"``. They favour
clarity over speed and materialise whatever they need (e.g. the L x S score matrix).
"""

from __future__ import annotations

import math

import torch


# ---------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------
def visible_keys(
    L: int,
    S: int,
    *,
    is_causal: bool = False,
    window: tuple[int, int] | None = None,
    causal_alignment: str = "top_left",
    device: torch.device | str = "cpu",
) -> torch.Tensor | None:
    """Bool (L, S): True where query i may see key j under causal/window rules (None = all)."""
    left, right = window if window is not None else (-1, -1)
    if is_causal:
        right = 0 if right < 0 else min(right, 0)
    if left < 0 and right < 0:
        return None
    offset = 0 if causal_alignment == "top_left" else S - L
    i = torch.arange(L, device=device)[:, None] + offset  # (L, 1) query position in key space
    j = torch.arange(S, device=device)[None, :]  # (1, S)
    ok = torch.ones(L, S, dtype=torch.bool, device=device)
    if left >= 0:
        ok &= j >= i - left
    if right >= 0:
        ok &= j <= i + right
    return ok


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    window: tuple[int, int] | None = None,
    causal_alignment: str = "top_left",
    return_lse: bool = False,
    dropout_mask: torch.Tensor | None = None,
    softcap: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    return_dropout_mask: bool = False,
):
    """Reference attention with SDPA semantics (see fastattn.scaled_dot_product_attention).

    query (B, H, L, E), key (B, Hkv, S, E), value (B, Hkv, S, Ev). Rows with no visible key give
    zeros (and lse = -inf), never NaN, in the forward and the backward. ``dropout_mask`` (bool,
    broadcastable to (B, H, L, S), True = keep) replaces the random draw when given;
    ``return_dropout_mask`` appends the keep mask used (bool (B, H, L, S); None without
    dropout) to the outputs.
    Score modifiers, in this order after the scale: ``softcap`` (s = softcap * tanh(s / softcap)),
    ``alibi_slopes`` (H,) or (B, H) (s -= slope * |pos_q - pos_k|, query i at key position i, or
    i + S - L with causal_alignment="bottom_right"), then the masks, then the softmax over the
    scores and, with ``sinks`` (H,), one extra logit per head that has no value row (its
    probability is dropped; lse includes it). Computed in query's dtype (the slopes and sinks
    are cast to it), so float64 inputs give the oracle.
    Returns out (B, H, L, Ev) [, lse (B, H, L) in the compute dtype] [, keep mask].
    """
    B, H, L, E = query.shape
    Hkv, S = key.shape[1], key.shape[2]

    def outputs(out, lse, keep):
        if keep is not None:
            keep = keep.expand(B, H, L, S)
        return (out, *((lse,) if return_lse else ()), *((keep,) if return_dropout_mask else ()))

    if H != Hkv:
        # (B, Hkv, S, E) -> (B, H, S, E): head h reads kv head h // (H // Hkv)
        key = key.repeat_interleave(H // Hkv, dim=1)
        value = value.repeat_interleave(H // Hkv, dim=1)
    if scale is None:
        scale = 1.0 / math.sqrt(E) if E > 0 else 1.0  # E = 0: every score is 0 anyway
    sink = None if sinks is None else sinks.to(query.dtype)[None, :, None, None]  # (1, H, 1, 1)
    if S == 0:  # no keys at all: every row is empty (lse = the sink where there is one)
        out = query.new_zeros((B, H, L, value.shape[-1]))
        lse = query.new_full((B, H, L), float("-inf"))
        if sink is not None:
            lse = sink[..., 0].expand(B, H, L)
        keep = dropout_mask
        if keep is None and dropout_p > 0.0:
            keep = query.new_ones((B, H, L, 0), dtype=torch.bool)
        return outputs(out, lse, keep) if return_lse or return_dropout_mask else out
    s = torch.matmul(query, key.transpose(-2, -1)) * scale  # (B, H, L, S)
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(s.dtype)
        slopes = slopes.reshape(1, H, 1, 1) if slopes.dim() == 1 else slopes.reshape(B, H, 1, 1)
        offset = 0 if causal_alignment == "top_left" else S - L
        qpos = torch.arange(L, device=query.device)[:, None] + offset  # (L, 1)
        kpos = torch.arange(S, device=query.device)[None, :]  # (1, S)
        s = s - slopes * (qpos - kpos).abs().to(s.dtype)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            s = s.masked_fill(~attn_mask, float("-inf"))
        else:
            s = s + attn_mask.to(s.dtype)
    vis = visible_keys(L, S, is_causal=is_causal, window=window,
                       causal_alignment=causal_alignment, device=query.device)
    if vis is not None:
        s = s.masked_fill(~vis, float("-inf"))
    # softmax that is exactly 0 (not NaN) on rows where every key is masked, forward and backward
    if sink is not None:  # the sink as one more column, dropped after the softmax
        s = torch.cat((s, sink.expand(B, H, L, 1)), dim=-1)
    m = s.detach().amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)  # masked keys -> exp(-inf) = 0
    denom = p.sum(dim=-1, keepdim=True)
    if sink is not None:
        p = p[..., :S]
    empty = denom == 0
    safe = torch.where(empty, torch.ones_like(denom), denom)
    p = p / safe
    # -inf on empty rows, with a zero (not NaN) gradient through log(0)
    lse = torch.where(empty, torch.full_like(denom, float("-inf")), torch.log(safe) + m).squeeze(-1)
    if dropout_p > 0.0 or dropout_mask is not None:
        if dropout_mask is None:
            dropout_mask = torch.rand_like(p) >= dropout_p
        p = p * dropout_mask / (1.0 - dropout_p)
    out = torch.matmul(p, value)
    if return_lse or return_dropout_mask:
        return outputs(out, lse, dropout_mask)
    return out


def attention_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    k_new: torch.Tensor | None = None,
    v_new: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    causal: bool = True,
    cache_leftpad: torch.Tensor | None = None,
    rotary_cos: torch.Tensor | None = None,
    rotary_sin: torch.Tensor | None = None,
    rotary_interleaved: bool = False,
    softcap: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    window: tuple[int, int] | None = None,
    return_lse: bool = False,
    block_table: torch.Tensor | None = None,
):
    """Reference decoding attention; writes k_new/v_new into the caches in place. Sequence b
    holds cache positions [cache_leftpad[b] (0 without), total_b = cache_seqlens[b] (+ Lnew with
    k_new (B, Hkv, Lnew, E))); its Lq queries are the last Lq positions, total_b - Lq + i.
    softcap / alibi_slopes / sinks / window as in scaled_dot_product_attention with bottom-right
    alignment inside the cache.
    block_table int32 (B, max_blocks): paged caches (num_blocks, Hkv, block_size, E); token t of
    sequence b lives in block block_table[b, t // block_size], slot t % block_size.
    With rotary_cos/rotary_sin, k_new token i is rotated (apply_rotary) at position
    max(0, cache_seqlens[b] - cache_leftpad[b] + i) before it is written, and q token i at
    max(0, total_b - Lq - cache_leftpad[b] + i).
    Returns out (B, H, Lq, Ev) [, lse (B, H, Lq) in q's dtype with return_lse]."""
    B, H, Lq, E = q.shape
    rotary = rotary_cos is not None or rotary_sin is not None
    if rotary and (rotary_cos is None or rotary_sin is None):
        raise ValueError("fastattn.attention_with_kvcache: rotary_cos and rotary_sin must be "
                         "given together")
    if rotary and k_new is None:
        raise ValueError("fastattn.attention_with_kvcache: rotary_cos/rotary_sin need k_new and "
                         "v_new")
    if B == 0:
        out = q.new_zeros((0, H, Lq, v_cache.shape[-1]))
        return (out, q.new_zeros((0, H, Lq))) if return_lse else out
    Lnew = 0 if k_new is None else k_new.shape[2]
    bs = 0 if block_table is None else k_cache.shape[2]
    outs, lses = [], []
    for b in range(B):
        n = int(cache_seqlens[b])
        lp = 0 if cache_leftpad is None else int(cache_leftpad[b])
        total = n + Lnew
        qb = q[b:b + 1]
        if block_table is not None:
            t = torch.arange(total, device=q.device)
            blk = block_table[b].to(q.device).long()[t // bs]  # (total,) block of each token
            slot = t % bs
        if k_new is not None:
            kb = k_new[b]  # (Hkv, Lnew, E)
            if rotary:
                kpos = (torch.arange(Lnew, device=q.device) + (n - lp)).clamp_min(0)
                kb = apply_rotary(kb, rotary_cos[kpos], rotary_sin[kpos], rotary_interleaved)
            if block_table is None:
                k_cache[b, :, n:total] = kb
                v_cache[b, :, n:total] = v_new[b]
            else:  # k_cache[blk[i], :, slot[i]] is (Lnew, Hkv, E): tokens first
                k_cache[blk[n:], :, slot[n:]] = kb.transpose(0, 1).to(k_cache.dtype)
                v_cache[blk[n:], :, slot[n:]] = v_new[b].transpose(0, 1).to(v_cache.dtype)
        if rotary:
            qpos = (torch.arange(Lq, device=q.device) + (total - Lq - lp)).clamp_min(0)
            qb = apply_rotary(qb, rotary_cos[qpos], rotary_sin[qpos], rotary_interleaved)
        first = min(lp, total)
        if block_table is None:
            k = k_cache[b:b + 1, :, first:total]  # (1, Hkv, total - first, E)
            v = v_cache[b:b + 1, :, first:total]
        else:  # gathered token by token: (total - first, Hkv, E) -> (1, Hkv, total - first, E)
            k = k_cache[blk[first:], :, slot[first:]].transpose(0, 1)[None]
            v = v_cache[blk[first:], :, slot[first:]].transpose(0, 1)[None]
        slopes = alibi_slopes
        if slopes is not None and slopes.dim() == 2:
            slopes = slopes[b]
        out, lse = scaled_dot_product_attention(
            qb, k.to(q.dtype), v.to(q.dtype), is_causal=causal, scale=scale,
            enable_gqa=True, window=window, causal_alignment="bottom_right", return_lse=True,
            softcap=softcap, alibi_slopes=slopes, sinks=sinks)
        outs.append(out)
        lses.append(lse)
    out = torch.cat(outs, dim=0)
    return (out, torch.cat(lses, dim=0)) if return_lse else out


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 interleaved: bool = False) -> torch.Tensor:
    """Rotary embedding of x (..., L, E) by the table rows cos/sin (L, rotary_dim / 2): dims
    [0, rotary_dim) rotated in pairs (j, j + rotary_dim/2) (GPT-NeoX / Llama), or (2j, 2j + 1)
    with interleaved (GPT-J), the rest passed through. For a pair (x1, x2):
    (x1 cos - x2 sin, x2 cos + x1 sin), computed in float32 (float64 for float64 x) and returned
    in x's dtype."""
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    half = cos.shape[-1]
    xf = x.to(cd)
    c, s = cos.to(cd), sin.to(cd)
    rot, rest = xf[..., :2 * half], xf[..., 2 * half:]
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
    else:
        x1, x2 = rot[..., :half], rot[..., half:]
    y1, y2 = x1 * c - x2 * s, x2 * c + x1 * s
    y = torch.stack((y1, y2), dim=-1).flatten(-2) if interleaved else torch.cat((y1, y2), dim=-1)
    return torch.cat((y, rest), dim=-1).to(x.dtype)


def attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    *,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    window: tuple[int, int] | None = None,
    causal_alignment: str = "top_left",
    softcap: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    return_lse: bool = False,
    dropout_mask: torch.Tensor | None = None,
    return_dropout_mask: bool = False,
):
    """Reference packed variable-length attention (see fastattn.attention_varlen): one
    scaled_dot_product_attention call per sequence, sequence b being the rows
    q[cu_seqlens_q[b]:cu_seqlens_q[b + 1]] (total_q, H, E) against
    k/v[cu_seqlens_k[b]:cu_seqlens_k[b + 1]] (total_k, Hkv, E / Ev), GQA when H != Hkv.
    ``alibi_slopes`` (H,) or (B, H) (row b for sequence b); every other keyword as in
    scaled_dot_product_attention, per sequence. ``dropout_mask`` (bool, (total_q, H, S_max) with
    S_max >= every sequence's key count, True = keep) holds query row r's keep flag for key j of
    its own sequence at [r, h, j]; without it the draws come from torch's default generator, as
    scaled_dot_product_attention's. ``return_dropout_mask`` appends the keep mask used in that
    layout, (total_q, H, max_seqlen_k) (max_seqlen_k None: the longest sequence's keys), False
    past each sequence's keys (None without dropout). max_seqlen_* are not needed otherwise.
    Computed in q's dtype (float64 inputs give the oracle).
    Returns out (total_q, H, Ev) [, lse (H, total_q) in the compute dtype] [, keep mask].
    """
    total_q, H, _ = q.shape
    Ev = v.shape[-1]
    cq = [int(x) for x in cu_seqlens_q.tolist()]
    ck = [int(x) for x in cu_seqlens_k.tolist()]
    outs, lses = [], []
    drawn = dropout_mask is None and dropout_p > 0.0 and return_dropout_mask
    if drawn:
        smax = max([ck[b + 1] - ck[b] for b in range(len(ck) - 1)] + [0])
        smax = smax if max_seqlen_k is None else int(max_seqlen_k)
        dropout_mask = q.new_zeros((total_q, H, smax), dtype=torch.bool)
    for b in range(len(cq) - 1):
        # (L_b, H, E) rows -> (1, H, L_b, E)
        qb = q[cq[b]:cq[b + 1]].transpose(0, 1)[None]
        kb = k[ck[b]:ck[b + 1]].transpose(0, 1)[None]
        vb = v[ck[b]:ck[b + 1]].transpose(0, 1)[None]
        slopes = alibi_slopes
        if slopes is not None and slopes.dim() == 2:
            slopes = slopes[b]
        keep = None
        if dropout_mask is not None:  # (L_b, H, S_b) -> (1, H, L_b, S_b)
            keep = dropout_mask[cq[b]:cq[b + 1], :, :ck[b + 1] - ck[b]].transpose(0, 1)[None]
        o, lse, *drew = scaled_dot_product_attention(
            qb, kb, vb, None, dropout_p, is_causal, scale, enable_gqa=True, window=window,
            causal_alignment=causal_alignment, return_lse=True,
            dropout_mask=None if drawn else keep, softcap=softcap, alibi_slopes=slopes,
            sinks=sinks, return_dropout_mask=drawn)
        if drawn:  # (1, H, L_b, S_b) -> rows [cq[b], cq[b + 1]), keys [0, S_b)
            dropout_mask[cq[b]:cq[b + 1], :, :ck[b + 1] - ck[b]] = drew[0][0].transpose(0, 1)
        outs.append(o[0].transpose(0, 1))  # (L_b, H, Ev)
        lses.append(lse[0])  # (H, L_b)
    out = torch.cat(outs, dim=0) if outs else q.new_zeros((0, H, Ev))
    lse = torch.cat(lses, dim=1) if lses else q.new_zeros((H, 0))
    keep = dropout_mask if dropout_p > 0.0 or dropout_mask is not None else None
    if not (return_lse or return_dropout_mask):
        return out
    return (out, *((lse,) if return_lse else ()), *((keep,) if return_dropout_mask else ()))


# ---------------------------------------------------------------------------------------------
# normalisation
# ---------------------------------------------------------------------------------------------
def _norm_rows(x, dims, rms, eps):
    """x -> (x - mean) * rstd (rms: x * rstd) over dims."""
    if rms:
        return x * torch.rsqrt(x.pow(2).mean(dim=dims, keepdim=True) + eps)
    mean = x.mean(dim=dims, keepdim=True)
    var = (x - mean).pow(2).mean(dim=dims, keepdim=True)
    return (x - mean) * torch.rsqrt(var + eps)


def _fused_norm(rms, input, normalized_shape, weight, bias, eps, residual, x1, weight1, bias1,
                rowscale, dropout_p, dropout_mask, dropout_mask1, residual_in_fp32, prenorm,
                return_dropout_mask, offset, quantize):
    """FlashAttention's layer_norm_fn / rms_norm_fn (see fastattn.layer_norm for the contract):
        x' = dropout(input * rowscale) (+ dropout(x1)) (+ residual), held in the residual dtype
             (float32 with residual_in_fp32, else residual's dtype, else input's dtype)
        out = norm(x') * (offset + weight) + bias [, out1 = norm(x') * (offset + weight1) + bias1]
    Returns out [, out1] [, residual_out] [, dropout_mask, dropout_mask1]; with quantize="int8"
    out is replaced by (out_int8, scale): quantize_per_token of out in input's dtype."""
    if isinstance(normalized_shape, int):
        normalized_shape = (normalized_shape,)
    nd = len(normalized_shape)
    dims = tuple(range(-nd, 0))
    if eps is None:
        eps = torch.finfo(input.dtype).eps
    res_dtype = (torch.float32 if residual_in_fp32 and input.dtype != torch.float64
                 else residual.dtype if residual is not None else input.dtype)
    keep = 1.0 - dropout_p
    x = input.to(res_dtype) if input.dtype != res_dtype else input
    if rowscale is not None:
        x = x * rowscale.to(x.dtype).reshape(rowscale.shape + (1,) * nd)
    if dropout_p > 0.0:
        if dropout_mask is None:
            dropout_mask = torch.rand(input.shape, device=input.device) >= dropout_p
        x = x * dropout_mask / keep
    if x1 is not None:
        x1c = x1.to(res_dtype)
        if dropout_p > 0.0:
            if dropout_mask1 is None:
                dropout_mask1 = torch.rand(x1.shape, device=x1.device) >= dropout_p
            x1c = x1c * dropout_mask1 / keep
        x = x + x1c
    if residual is not None:
        x = x + residual.to(res_dtype)
    xc = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    xhat = _norm_rows(xc, dims, rms, eps)

    def affine(w, b):
        y = xhat
        if w is not None:
            y = y * (offset + w.to(xhat.dtype))
        if b is not None:
            y = y + b.to(xhat.dtype)
        return y.to(input.dtype)

    outs = []
    out = affine(weight, bias)
    if quantize is not None:
        outs += list(quantize_per_token(out))
    else:
        outs.append(out)
    if weight1 is not None:
        outs.append(affine(weight1, bias1))
    if prenorm if prenorm is not None else residual is not None:
        outs.append(x)
    if return_dropout_mask:
        outs += [dropout_mask if dropout_p > 0.0 else None,
                 dropout_mask1 if dropout_p > 0.0 and x1 is not None else None]
    return outs[0] if len(outs) == 1 else tuple(outs)


def layer_norm(
    input: torch.Tensor,
    normalized_shape,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    residual: torch.Tensor | None = None,
    x1: torch.Tensor | None = None,
    weight1: torch.Tensor | None = None,
    bias1: torch.Tensor | None = None,
    rowscale: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_mask: torch.Tensor | None = None,
    dropout_mask1: torch.Tensor | None = None,
    residual_in_fp32: bool = False,
    prenorm: bool | None = None,
    return_dropout_mask: bool = False,
    offset: float = 0.0,
    quantize: str | None = None,
):
    """F.layer_norm; with residual= returns (layer_norm(input + residual), input + residual).
    The other keywords are FlashAttention's layer_norm_fn (fastattn.layer_norm documents them);
    dropout_mask / dropout_mask1 (bool, input-shaped, True = keep) replace the random draws, so a
    kernel's returned masks can be checked exactly."""
    fused = (x1 is not None or weight1 is not None or bias1 is not None or rowscale is not None
             or dropout_p > 0.0 or residual_in_fp32 or prenorm is not None
             or return_dropout_mask or offset != 0.0 or quantize is not None
             or (residual is not None and residual.dtype != input.dtype))
    if fused:
        return _fused_norm(False, input, normalized_shape, weight, bias, eps, residual, x1,
                           weight1, bias1, rowscale, dropout_p, dropout_mask, dropout_mask1,
                           residual_in_fp32, prenorm, return_dropout_mask, offset, quantize)
    if isinstance(normalized_shape, int):
        normalized_shape = (normalized_shape,)
    x = input if residual is None else input + residual
    dims = tuple(range(-len(normalized_shape), 0))
    out = _norm_rows(x, dims, False, eps)
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out if residual is None else (out, x)


def rms_norm(
    input: torch.Tensor,
    normalized_shape,
    weight: torch.Tensor | None = None,
    eps: float | None = None,
    *,
    residual: torch.Tensor | None = None,
    x1: torch.Tensor | None = None,
    weight1: torch.Tensor | None = None,
    rowscale: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_mask: torch.Tensor | None = None,
    dropout_mask1: torch.Tensor | None = None,
    residual_in_fp32: bool = False,
    prenorm: bool | None = None,
    return_dropout_mask: bool = False,
    offset: float = 0.0,
    quantize: str | None = None,
):
    """F.rms_norm (eps=None means torch.finfo(input.dtype).eps); residual= as in layer_norm, the
    other keywords as in layer_norm (offset=1.0 is Gemma's x_hat * (1 + weight))."""
    fused = (x1 is not None or weight1 is not None or rowscale is not None
             or dropout_p > 0.0 or residual_in_fp32 or prenorm is not None
             or return_dropout_mask or offset != 0.0 or quantize is not None
             or (residual is not None and residual.dtype != input.dtype))
    if fused:
        return _fused_norm(True, input, normalized_shape, weight, None, eps, residual, x1,
                           weight1, None, rowscale, dropout_p, dropout_mask, dropout_mask1,
                           residual_in_fp32, prenorm, return_dropout_mask, offset, quantize)
    if isinstance(normalized_shape, int):
        normalized_shape = (normalized_shape,)
    if eps is None:
        eps = torch.finfo(input.dtype).eps
    x = input if residual is None else input + residual
    dims = tuple(range(-len(normalized_shape), 0))
    out = _norm_rows(x, dims, True, eps)
    if weight is not None:
        out = out * weight
    return out if residual is None else (out, x)


# ---------------------------------------------------------------------------------------------
# activations
# ---------------------------------------------------------------------------------------------
def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """x (..., 2*I) -> silu(x[..., :I]) * x[..., I:], (..., I) in x's dtype (vLLM's
    silu_and_mul: the output of one fused gate/up projection, gate half first). Differentiable
    (PyTorch's own silu backward, finite for any finite gate)."""
    n = x.shape[-1]
    if n == 0 or n % 2:
        raise ValueError(f"silu_mul: x.shape[-1] must be even and > 0, got {n}")
    gate, up = x.split(n // 2, dim=-1)
    return torch.nn.functional.silu(gate) * up


# ---------------------------------------------------------------------------------------------
# int8
# ---------------------------------------------------------------------------------------------
def _quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Exact contract every backend reproduces bit for bit:
    #   absmax = max|x| over the row (in float32); scale = absmax / 127;
    #   q = clamp(round_half_even(x * (127 / absmax)), -127, 127), q = 0 on rows with absmax = 0.
    xf = x.float()
    absmax = xf.abs().amax(dim=-1)
    inv = torch.where(absmax > 0, 127.0 / absmax, torch.zeros_like(absmax))
    q = torch.round(xf * inv.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return q, absmax / 127.0


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: x (..., K) -> (x_int8 (..., K), scale float32 (...))."""
    return _quantize_rows(x)


def quantize_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel: w (N, K) -> (w_int8 (N, K), scale float32 (N,))."""
    return _quantize_rows(w)


def int8_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    a_scale: torch.Tensor | None = None,
    b_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """a int8 (M, K) @ b int8 (N, K).T: int32 without scales, else
    (acc * a_scale[:, None] * b_scale[None, :] + bias) in out_dtype (default float32)."""
    acc = torch.matmul(a.to(torch.int64), b.to(torch.int64).t()).to(torch.int32)
    if a_scale is None and b_scale is None:
        return acc if out_dtype is None else acc.to(out_dtype)
    out = acc.to(torch.float64 if out_dtype == torch.float64 else torch.float32)
    if a_scale is not None:
        out = out * a_scale.to(out.dtype)[:, None]
    if b_scale is not None:
        out = out * b_scale.to(out.dtype)[None, :]
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out.to(out_dtype or torch.float32)


def int8_weight_only_linear(
    x: torch.Tensor,
    w_int8: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weight-only int8: x (M, K) float @ (w_int8 (N, K) * w_scale[:, None]).T + bias, accumulated
    in float32 (float64 for float64 x), in x's dtype."""
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    out = torch.matmul(x.to(acc_dtype), w_int8.to(acc_dtype).t()) * w_scale.to(acc_dtype)
    if bias is not None:
        out = out + bias.to(acc_dtype)
    return out.to(x.dtype)


def int8_linear(
    x: torch.Tensor,
    w_int8: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """W8A8 linear: x (..., K) quantized per token, times w_int8 (N, K), dequantized, in x's dtype."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])  # (M, K)
    q, s = quantize_per_token(x2)
    out = int8_gemm(q, w_int8, s, w_scale, bias, out_dtype=x.dtype)
    return out.reshape(*lead, w_int8.shape[0])
