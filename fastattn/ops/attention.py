"""Attention op layer: validation, mask/window normalisation, backend choice, torch.library
registration (fake tensors + autograd) of the C++ ops and of the Triton custom ops.

All kernels receive the same normalised arguments (see csrc/fastattn.cpp for the contract):
an additive float mask broadcast to (B, H, L, S) by strides, and causal/window rules folded into
(window_left, window_right, diag_offset).
"""

from __future__ import annotations

import math

import torch

from fastattn import reference
from fastattn.ops import _backend

_MAX_HEAD_DIM = 256

_backend.register_op("scaled_dot_product_attention", "attention_fwd")
_backend.register_op("attention_with_kvcache", "attention_kvcache")


# ---------------------------------------------------------------------------------------------
# argument checking and normalisation
# ---------------------------------------------------------------------------------------------
def _check_qkv(query, key, value, enable_gqa: bool) -> None:
    # the error kinds of F.scaled_dot_product_attention where it rejects the same call
    # (RuntimeError for a rank or a dtype mismatch), with the argument named
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise RuntimeError(f"{name} must be 4-D (B, H, L, E) here, got shape "
                               f"{tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if not (query.dtype == key.dtype == value.dtype):
        raise RuntimeError(f"query, key and value must have the same dtype, got query.dtype="
                           f"{query.dtype}, key.dtype={key.dtype}, value.dtype={value.dtype}")
    if not (query.device == key.device == value.device):
        raise RuntimeError(f"query, key and value must be on the same device, got query on "
                           f"{query.device}, key on {key.device}, value on {value.device}")
    B, H, L, E = query.shape
    if key.shape[0] != B or value.shape[0] != B:
        raise ValueError(f"batch sizes differ: query {B}, key {key.shape[0]}, value {value.shape[0]}")
    if key.shape[-1] != E:
        raise ValueError(f"head dims differ: query.shape[-1]={E}, key.shape[-1]={key.shape[-1]}")
    if key.shape[2] != value.shape[2]:
        raise ValueError(f"key and value must have the same sequence length, got "
                         f"key.shape[2]={key.shape[2]}, value.shape[2]={value.shape[2]}")
    if key.shape[1] != value.shape[1]:
        raise ValueError(f"key and value must have the same number of heads, got "
                         f"key.shape[1]={key.shape[1]}, value.shape[1]={value.shape[1]}")
    Hkv = key.shape[1]
    if H != Hkv:
        if not enable_gqa:
            raise ValueError(f"query has {H} heads but key/value have {Hkv}: pass enable_gqa=True "
                             "for grouped-query attention")
        if Hkv == 0 or H % Hkv != 0:
            raise ValueError(f"enable_gqa needs query heads ({H}) to be a multiple of key/value "
                             f"heads ({Hkv})")


def _normalize_mask(attn_mask, query, key) -> torch.Tensor | None:
    """bool/float mask broadcastable to (B, H, L, S) -> additive mask in query.dtype, expanded to
    (B, H, L, S) as a view (stride 0 on broadcast dims: no copy of the broadcast)."""
    if attn_mask is None:
        return None
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
    if attn_mask.device != query.device:
        raise RuntimeError(f"attn_mask must be on {query.device}, got {attn_mask.device}")
    B, H, L, _ = query.shape
    S = key.shape[2]
    try:
        shape = torch.broadcast_shapes(attn_mask.shape, (B, H, L, S))
    except RuntimeError as e:
        raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} is not broadcastable to "
                         f"(B, H, L, S) = {(B, H, L, S)}") from e
    if shape != (B, H, L, S):
        raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} is not broadcastable to "
                         f"(B, H, L, S) = {(B, H, L, S)}")
    if attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device
                                ).masked_fill_(~attn_mask, float("-inf"))
    elif attn_mask.dtype != query.dtype:
        raise TypeError(f"attn_mask must be bool or have query's dtype ({query.dtype}), "
                        f"got {attn_mask.dtype}")
    return attn_mask.expand(B, H, L, S)


def _window_args(L, S, is_causal, window, causal_alignment) -> tuple[int, int, int]:
    if causal_alignment not in ("top_left", "bottom_right"):
        raise ValueError(f"causal_alignment must be 'top_left' or 'bottom_right', "
                         f"got {causal_alignment!r}")
    left, right = -1, -1
    if window is not None:
        if (not isinstance(window, (tuple, list)) or len(window) != 2
                or not all(isinstance(w, int) and not isinstance(w, bool) for w in window)):
            raise TypeError(f"window must be a pair of ints (left, right), got {window!r}")
        left, right = window
        if left < -1 or right < -1:
            raise ValueError(f"window sizes must be >= 0 (or -1 for unbounded), got {window!r}")
    if is_causal:
        right = 0 if right < 0 else min(right, 0)
    offset = 0 if causal_alignment == "top_left" else S - L
    return left, right, offset


def _check_scale(scale, E) -> float:
    if scale is None:
        return 1.0 / math.sqrt(E) if E > 0 else 1.0  # E = 0: every score is 0 anyway
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return scale


def _check_kvcache(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale,
                   cache_leftpad, rotary_cos=None, rotary_sin=None, softcap=0.0,
                   alibi_slopes=None, sinks=None, block_table=None, window_left=-1,
                   window_right=-1) -> float:
    """attention_with_kvcache's argument rules (csrc/checks.cpp, shared with the kernels: the
    values of cache_seqlens / cache_leftpad / block_table are checked where they are on the
    host) -> the scale resolved. While torch.compile traces, the op's fake function runs the
    same checks; without the extension only the scale and the score modifiers are checked."""
    if _backend.NATIVE is not None and not torch.compiler.is_compiling():
        return _backend.NATIVE.check_kvcache(q, k_cache, v_cache, cache_seqlens, k_new, v_new,
                                             scale, cache_leftpad, rotary_cos, rotary_sin,
                                             float(softcap), alibi_slopes, sinks, block_table,
                                             window_left, window_right)
    if q.dim() == 4:
        _check_score_mods("fastattn.attention_with_kvcache", q, alibi_slopes, sinks)
    return _check_scale(scale, q.shape[-1])


def _softcap_arg(fn: str, softcap) -> float:
    """The public softcap (None or a float > 0) -> the ops' float (0.0: none)."""
    if softcap is None:
        return 0.0
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise TypeError(f"{fn}: softcap must be a float > 0 or None, got {type(softcap).__name__}")
    softcap = float(softcap)
    if not (math.isfinite(softcap) and softcap > 0.0):
        raise ValueError(f"{fn}: softcap must be a finite float > 0 (or None), got {softcap}")
    return softcap


def _check_score_mods(fn: str, query: torch.Tensor, alibi_slopes, sinks) -> None:
    """alibi_slopes float32 (H,) or (B, H), sinks float32 (H,), on query's device (the rules of
    csrc/checks.cpp's check_score_mods, which attention_with_kvcache runs)."""
    B, H = query.shape[0], query.shape[1]
    for name, t in (("alibi_slopes", alibi_slopes), ("sinks", sinks)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor or None, got {type(t).__name__}")
        if t.dtype != torch.float32:
            raise TypeError(f"{fn}: {name} must be a float32 tensor, got {t.dtype}")
    if alibi_slopes is not None:
        shape = tuple(alibi_slopes.shape)
        if shape not in ((H,), (B, H)):
            raise ValueError(f"{fn}: alibi_slopes must have shape (H,) = ({H},) or (B, H) = "
                             f"({B}, {H}), got {list(shape)}")
        if alibi_slopes.device != query.device:
            raise RuntimeError(f"{fn}: alibi_slopes must be on the same device as query "
                               f"({query.device}), got {alibi_slopes.device}")
    if sinks is not None:
        if tuple(sinks.shape) != (H,):
            raise ValueError(f"{fn}: sinks must have shape (H,) = ({H},), got "
                             f"{list(sinks.shape)}")
        if sinks.device != query.device:
            raise RuntimeError(f"{fn}: sinks must be on the same device as query "
                               f"({query.device}), got {sinks.device}")


def _slopes_bh(alibi_slopes, B: int, H: int):
    """(H,) or (B, H) slopes -> the (B, H) view the kernels read (stride 0 on a broadcast batch)."""
    if alibi_slopes is None:
        return None
    alibi_slopes = alibi_slopes.contiguous()  # unit head stride (the CPU kernels' layout)
    return alibi_slopes.expand(B, H) if alibi_slopes.dim() == 1 else alibi_slopes


def _draw_seed(dropout_p: float) -> int:
    if dropout_p == 0.0:
        return 0
    # from torch's default CPU generator, so torch.manual_seed makes dropout reproducible
    return int(torch.randint(0, 2**62, (1,), dtype=torch.int64).item())


# ---------------------------------------------------------------------------------------------
# backend support predicates
# ---------------------------------------------------------------------------------------------
def _supports(backend: str, device: torch.device, key: tuple) -> str | None:
    """None when ``backend``'s kernels handle a call with these properties (key = (dtype,
    head_dim, dropout[, score_mods]); score_mods: softcap, alibi_slopes or sinks given), else
    the reason (shown by "auto"'s fallback warning and by the error of an explicit backend)."""
    dtype, head_dim, dropout, *rest = key
    score_mods = bool(rest and rest[0])
    if dtype not in _backend.FLOAT_DTYPES:
        return f"dtype {dtype}"
    if head_dim > _MAX_HEAD_DIM:
        return f"head dim {head_dim} > {_MAX_HEAD_DIM}"
    if backend == "cuda" and dropout:
        return "dropout_p > 0 is not implemented by the CUDA kernels"
    if backend == "cuda" and score_mods:
        return "softcap, alibi_slopes and sinks are not implemented by the CUDA kernels"
    if backend == "triton" and device.type == "cuda":
        # Triton's tensor-core paths need Volta+ (sm_70) and bfloat16 needs Ampere (sm_80)
        major, minor = torch.cuda.get_device_capability(device)
        if major < 7:
            return f"compute capability {major}.{minor} < 7.0"
        if dtype == torch.bfloat16 and major < 8:
            return f"bfloat16 needs compute capability >= 8.0, got {major}.{minor}"
        from fastattn.triton.attention import attention_unsupported_reason

        return attention_unsupported_reason(dtype, head_dim, device)
    return None


def _choose(op: str, device: torch.device, backend: str, dtype: torch.dtype, head_dim: int,
            dropout: bool = False, score_mods: bool = False) -> str:
    return _backend.pick(op, device, backend, (dtype, head_dim, dropout, score_mods), _supports)


# the backends whose attention_kvcache kernels implement rotary_cos / rotary_sin
_KVCACHE_ROTARY = ("cpu", "triton", "cuda")


# the backends whose attention_kvcache kernels implement block_table, window, return_lse and
# k_new/v_new of another length than q
_KVCACHE_SERVING = ("cpu", "triton", "cuda")


def _kvcache_supports(backend: str, device: torch.device, key: tuple) -> str | None:
    """_supports for attention_with_kvcache: key = (dtype, head_dim, rotary[, score_mods[,
    paged, window, return_lse, lnew_differs]])."""
    dtype, head_dim, rotary, *rest = key
    if rotary and backend not in _KVCACHE_ROTARY:
        return f"rotary_cos/rotary_sin are not implemented by the {backend} kernels"
    serving = rest[1:]
    if any(serving) and backend not in _KVCACHE_SERVING:
        names = [n for n, on in zip(("block_table", "window", "return_lse",
                                     "k_new/v_new with Lnew != Lq"), serving, strict=True) if on]
        return f"{', '.join(names)}: not implemented by the {backend} kernels"
    return _supports(backend, device, (dtype, head_dim, False, bool(rest and rest[0])))


def _kv_window(window) -> tuple[int, int]:
    """attention_with_kvcache's window=(left, right) -> the raw pair (-1: unbounded; causal is
    folded in by the kernels)."""
    if window is None:
        return -1, -1
    left, right, _ = _window_args(0, 0, False, window, "bottom_right")
    return left, right


# ---------------------------------------------------------------------------------------------
# Triton custom ops (the launchers live in fastattn/triton/attention.py)
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("fastattn::triton_attention_fwd", mutates_args=())
def triton_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
    scale: float, window_left: int, window_right: int, diag_offset: int,
    dropout_p: float, seed: int, softcap: float = 0.0, alibi_slopes: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    from fastattn.triton.attention import attention_fwd

    return attention_fwd(q, k, v, attn_mask, scale, window_left, window_right, diag_offset,
                         dropout_p, seed, softcap, alibi_slopes, sinks)


@torch.library.custom_op("fastattn::triton_attention_bwd", mutates_args=())
def triton_attention_bwd(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor, grad_lse: torch.Tensor | None,
    attn_mask: torch.Tensor | None, scale: float, window_left: int, window_right: int,
    diag_offset: int, dropout_p: float, seed: int, compute_dmask: bool, deterministic: bool,
    softcap: float = 0.0, alibi_slopes: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from fastattn.triton.attention import attention_bwd

    return attention_bwd(grad_out, q, k, v, out, lse, grad_lse, attn_mask, scale, window_left,
                         window_right, diag_offset, dropout_p, seed, compute_dmask, deterministic,
                         softcap, alibi_slopes, sinks)


@torch.library.custom_op("fastattn::triton_attention_kvcache", mutates_args=("k_cache", "v_cache"))
def triton_attention_kvcache(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
    k_new: torch.Tensor | None, v_new: torch.Tensor | None, scale: float, causal: bool,
    cache_leftpad: torch.Tensor | None = None, rotary_cos: torch.Tensor | None = None,
    rotary_sin: torch.Tensor | None = None, rotary_interleaved: bool = False,
    softcap: float = 0.0, alibi_slopes: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None, block_table: torch.Tensor | None = None,
    window_left: int = -1, window_right: int = -1,
) -> torch.Tensor:
    from fastattn.triton.attention import attention_kvcache

    return attention_kvcache(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale, causal,
                             cache_leftpad, rotary_cos, rotary_sin, rotary_interleaved,
                             softcap, alibi_slopes, sinks, block_table, window_left,
                             window_right)


@torch.library.custom_op("fastattn::triton_attention_kvcache_lse",
                         mutates_args=("k_cache", "v_cache"))
def triton_attention_kvcache_lse(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
    k_new: torch.Tensor | None, v_new: torch.Tensor | None, scale: float, causal: bool,
    cache_leftpad: torch.Tensor | None = None, rotary_cos: torch.Tensor | None = None,
    rotary_sin: torch.Tensor | None = None, rotary_interleaved: bool = False,
    softcap: float = 0.0, alibi_slopes: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None, block_table: torch.Tensor | None = None,
    window_left: int = -1, window_right: int = -1,
) -> tuple[torch.Tensor, torch.Tensor]:
    from fastattn.triton.attention import attention_kvcache

    return attention_kvcache(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale, causal,
                             cache_leftpad, rotary_cos, rotary_sin, rotary_interleaved,
                             softcap, alibi_slopes, sinks, block_table, window_left,
                             window_right, return_lse=True)


# ---------------------------------------------------------------------------------------------
# fake tensors and autograd, shared by the C++ ops and the Triton custom ops
# ---------------------------------------------------------------------------------------------
def _fwd_fake(q, k, v, attn_mask, scale, window_left, window_right, diag_offset, dropout_p, seed,
              softcap=0.0, alibi_slopes=None, sinks=None):
    B, H, L, _ = q.shape
    out = q.new_empty((B, L, H, v.shape[-1])).transpose(1, 2)  # token-major, as the kernels
    lse = q.new_empty((B, H, L), dtype=torch.float32)
    return out, lse


def _bwd_fake(grad_out, q, k, v, out, lse, grad_lse, attn_mask, scale, window_left,
              window_right, diag_offset, dropout_p, seed, compute_dmask, deterministic,
              softcap=0.0, alibi_slopes=None, sinks=None):
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    if compute_dmask and attn_mask is not None:
        B, H, L, _ = q.shape
        dmask = attn_mask.new_empty((B, H, L, k.shape[2]))
    else:
        dmask = q.new_empty((0,))
    dsinks = q.new_empty((q.shape[1] if sinks is not None else 0,), dtype=torch.float32)
    return dq, dk, dv, dmask, dsinks


def _kvcache_fake(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale, causal,
                  cache_leftpad=None, rotary_cos=None, rotary_sin=None, rotary_interleaved=False,
                  softcap=0.0, alibi_slopes=None, sinks=None, block_table=None, window_left=-1,
                  window_right=-1):
    _check_kvcache(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale, cache_leftpad,
                   rotary_cos, rotary_sin, softcap, alibi_slopes, sinks, block_table,
                   window_left, window_right)
    B, H, Lq, _ = q.shape
    return q.new_empty((B, H, Lq, v_cache.shape[-1]))


def _kvcache_lse_fake(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale, causal,
                      cache_leftpad=None, rotary_cos=None, rotary_sin=None,
                      rotary_interleaved=False, softcap=0.0, alibi_slopes=None, sinks=None,
                      block_table=None, window_left=-1, window_right=-1):
    out = _kvcache_fake(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale, causal,
                        cache_leftpad, rotary_cos, rotary_sin, rotary_interleaved, softcap,
                        alibi_slopes, sinks, block_table, window_left, window_right)
    return out, q.new_empty(q.shape[:3], dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    q, k, v, attn_mask, scale, wl, wr, off, dropout_p, seed, *mods = inputs
    softcap, alibi_slopes, sinks = (mods + [0.0, None, None][len(mods):])
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, attn_mask, alibi_slopes, sinks)
    ctx.args = (scale, wl, wr, off, dropout_p, seed)
    ctx.softcap = softcap
    ctx.num_inputs = len(inputs)


def _make_backward(bwd_op):
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, attn_mask, alibi_slopes, sinks = ctx.saved_tensors
        compute_dmask = attn_mask is not None and ctx.needs_input_grad[3]
        # (the slopes get no gradient, as in FlashAttention)
        dq, dk, dv, dmask, dsinks = bwd_op(
            grad_out, q, k, v, out, lse, grad_lse, attn_mask, *ctx.args, compute_dmask,
            torch.are_deterministic_algorithms_enabled(), ctx.softcap, alibi_slopes, sinks)
        grads = [dq, dk, dv, (dmask if compute_dmask else None), None, None, None, None, None,
                 None, None, None, dsinks if sinks is not None else None]
        return tuple(grads[:ctx.num_inputs])

    return backward


@torch.library.custom_op("fastattn::triton_attention_dropout_mask", mutates_args=())
def triton_attention_dropout_mask(
    q: torch.Tensor, k: torch.Tensor, cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None, max_seqlen_q: int, max_seqlen_k: int, dropout_p: float,
    seed: int,
) -> torch.Tensor:
    from fastattn.triton.attention import attention_dropout_mask

    return attention_dropout_mask(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                  dropout_p, seed)


def _dropout_mask_fake(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                       seed):
    if cu_seqlens_q is None:  # (B, H, L, S)
        return q.new_empty((*q.shape[:3], k.shape[2]), dtype=torch.bool)
    return q.new_empty((q.shape[0], q.shape[1], max_seqlen_k), dtype=torch.bool)


def _dropout_keep_mask(chosen: str, q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int,
                       max_seqlen_k: int, dropout_p: float, seed: int) -> torch.Tensor | None:
    """The keep mask that ``chosen``'s attention kernels drew with this seed, written by the
    same backend's mask op from the same RNG function (fastattn::attention_dropout_mask):
    bool (B, H, L, S), or (total_q, H, max_seqlen_k) with cu_seqlens; None without dropout."""
    if dropout_p == 0.0:
        return None
    op = (torch.ops.fastattn.triton_attention_dropout_mask if chosen == "triton"
          else torch.ops.fastattn.attention_dropout_mask)
    return op(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, seed)


torch.library.register_fake("fastattn::triton_attention_dropout_mask")(_dropout_mask_fake)
torch.library.register_fake("fastattn::triton_attention_fwd")(_fwd_fake)
torch.library.register_fake("fastattn::triton_attention_bwd")(_bwd_fake)
torch.library.register_fake("fastattn::triton_attention_kvcache")(_kvcache_fake)
torch.library.register_fake("fastattn::triton_attention_kvcache_lse")(_kvcache_lse_fake)
torch.library.register_autograd("fastattn::triton_attention_fwd",
                                _make_backward(triton_attention_bwd), setup_context=_setup_context)


def _register_cpp() -> None:
    if not _backend._load_extension()[0]:
        return
    torch.library.register_fake("fastattn::attention_fwd")(_fwd_fake)
    torch.library.register_fake("fastattn::attention_bwd")(_bwd_fake)
    if hasattr(torch.ops.fastattn, "attention_dropout_mask"):
        torch.library.register_fake("fastattn::attention_dropout_mask")(_dropout_mask_fake)
    torch.library.register_fake("fastattn::attention_kvcache")(_kvcache_fake)
    torch.library.register_fake("fastattn::attention_kvcache_lse")(_kvcache_lse_fake)
    torch.library.register_autograd("fastattn::attention_fwd",
                                    _make_backward(torch.ops.fastattn.attention_bwd),
                                    setup_context=_setup_context)


_register_cpp()


# ---------------------------------------------------------------------------------------------
# public functions
# ---------------------------------------------------------------------------------------------
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
    softcap: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    return_dropout_mask: bool = False,
    backend: str = "auto",
):
    """Fused softmax attention, a drop-in for ``torch.nn.functional.scaled_dot_product_attention``.

    Args:
        query: (B, H, L, E) float16/bfloat16/float32.
        key: (B, Hkv, S, E); value: (B, Hkv, S, Ev). Hkv == H, or H % Hkv == 0 with enable_gqa.
        attn_mask: bool (True = attend) or additive float mask in query's dtype, broadcastable to
            (B, H, L, S). A float mask that requires grad receives its gradient.
        dropout_p: probability of dropping an attention weight, in [0, 1).
        is_causal: query i sees keys j <= i (top-left aligned, as SDPA), or j <= i + S - L with
            causal_alignment="bottom_right" (FlashAttention's convention for L != S).
        scale: softmax scale, default 1/sqrt(E).
        window: (left, right): query i sees keys i - left <= j <= i + right (positions aligned as
            causal_alignment says; -1 = unbounded on that side). Combines with is_causal/attn_mask.
        return_lse: also return the log-sum-exp of the scaled, masked scores, float32 (B, H, L)
            (the sink included).
        softcap: float > 0 or None: scores x = scale * q.k become softcap * tanh(x / softcap)
            (Gemma-2's attention logit soft-capping).
        alibi_slopes: float32 (H,) or (B, H), or None: x -= slope * |pos_q - pos_k|, query i at
            key position i (i + S - L with causal_alignment="bottom_right"). No gradient.
        sinks: float32 (H,) or None: one more logit per head in each row's softmax denominator,
            with no value row (gpt-oss's attention sinks); receives its gradient.
            Order: scale -> softcap -> alibi -> attn_mask / causal / window -> softmax (with the
            sink). A row with no visible key gives zeros (and lse = the sink).
        return_dropout_mask: also return the dropout keep mask the kernels drew (a debugging
            aid, like FlashAttention's return_attn_probs): bool (B, H, L, S), True = kept, the
            draw for every (query, key) pair whether visible or not; None when dropout_p = 0.
            Written by the backend's own mask op from the seed and RNG function of its attention
            kernels (the reference: the torch.rand draw it used), only when asked.
        backend: "auto" | "triton" | "cuda" | "cpu" | "reference".

    Rows where every key is masked give zeros (and lse = -inf) and zero gradients, never NaN.
    Set ``torch.use_deterministic_algorithms(True)`` for a bitwise-repeatable backward.

    Returns:
        out (B, H, L, Ev) in query's dtype, followed by lse when return_lse and by the keep
        mask when return_dropout_mask: out | (out, lse) | (out, mask) | (out, lse, mask).
        The kernels store out token-major ((B, L, H, Ev) memory, as FlashAttention and torch's
        CPU flash attention), so ``out.transpose(1, 2).reshape(B, L, H * Ev)`` is a view.
    """
    if all(isinstance(t, torch.Tensor) for t in (query, key, value)) and (
            query.dim() != 4 or key.dim() != 4 or value.dim() != 4):
        return _sdpa_any_rank(query, key, value, attn_mask, dropout_p, is_causal, scale,
                              enable_gqa, window=window, causal_alignment=causal_alignment,
                              return_lse=return_lse, softcap=softcap, alibi_slopes=alibi_slopes,
                              sinks=sinks, return_dropout_mask=return_dropout_mask,
                              backend=backend)
    _check_qkv(query, key, value, enable_gqa)
    fn = "fastattn.scaled_dot_product_attention"
    cap = _softcap_arg(fn, softcap)
    _check_score_mods(fn, query, alibi_slopes, sinks)
    score_mods = cap > 0.0 or alibi_slopes is not None or sinks is not None
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    dropout_p = float(dropout_p)
    B, H, L, E = query.shape
    S = key.shape[2]
    scale = _check_scale(scale, E)
    wl, wr, off = _window_args(L, S, is_causal, window, causal_alignment)
    mask = _normalize_mask(attn_mask, query, key)

    chosen = _choose("scaled_dot_product_attention", query.device, backend, query.dtype,
                     max(E, value.shape[-1]), dropout_p > 0.0, score_mods)
    if chosen == "reference" or query.numel() == 0 or value.numel() == 0:
        out, lse, *keep = reference.scaled_dot_product_attention(
            query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
            window=window, causal_alignment=causal_alignment, return_lse=True,
            softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks,
            return_dropout_mask=return_dropout_mask)
        return _outputs(out, lse.float(), *keep, return_lse=return_lse)
    op = (torch.ops.fastattn.triton_attention_fwd if chosen == "triton"
          else torch.ops.fastattn.attention_fwd)
    seed = _draw_seed(dropout_p)
    if score_mods:
        out, lse = op(query, key, value, mask, scale, wl, wr, off, dropout_p, seed, cap,
                      _slopes_bh(alibi_slopes, B, H), None if sinks is None else sinks.contiguous())
    else:  # the calls without modifiers keep their short argument list (and autograd node)
        out, lse = op(query, key, value, mask, scale, wl, wr, off, dropout_p, seed)
    if return_dropout_mask:
        keep = _dropout_keep_mask(chosen, query, key, None, None, L, S, dropout_p, seed)
        return _outputs(out, lse, keep, return_lse=return_lse)
    return (out, lse) if return_lse else out


def _outputs(out, lse, *keep, return_lse: bool):
    """out [, lse] [, keep mask]: the public functions' return order (keep given only when it
    was asked for)."""
    if not return_lse and not keep:
        return out
    return (out, *((lse,) if return_lse else ()), *keep)


def _sdpa_any_rank(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, *,
                   window, causal_alignment, return_lse, softcap, alibi_slopes, sinks,
                   return_dropout_mask, backend):
    """F.scaled_dot_product_attention's (..., L, E) inputs of rank 3 or more: the leading dims are
    batch dims (the one before L the heads, for GQA), run as (B, H, L, E) views of them."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.dim() < 3:
            raise RuntimeError(f"{name} must have at least 3 dimensions (..., L, E), got shape "
                               f"{tuple(t.shape)}")
    if not query.dim() == key.dim() == value.dim():
        raise RuntimeError(f"query, key and value must have the same number of dimensions, got "
                           f"query {tuple(query.shape)}, key {tuple(key.shape)}, value "
                           f"{tuple(value.shape)}")
    batch = query.shape[:-3]  # the dims before (H, L, E)

    def as4d(t: torch.Tensor) -> torch.Tensor:  # (..., H, L, E) -> (B, H, L, E), a view if it can
        return t.reshape(math.prod(t.shape[:-3]), *t.shape[-3:]) if t.dim() > 3 else t[None]

    mask = attn_mask
    if isinstance(mask, torch.Tensor) and mask.dim() > 2:
        # broadcast over the batch dims first, then fold them as the inputs are folded
        full = (*batch, query.shape[-3], query.shape[-2], key.shape[-2])
        try:
            mask = mask.expand(full)
        except RuntimeError as e:
            raise ValueError(f"attn_mask of shape {tuple(mask.shape)} is not broadcastable to "
                             f"{full}") from e
        mask = as4d(mask)
    out = scaled_dot_product_attention(
        as4d(query), as4d(key), as4d(value), mask, dropout_p, is_causal, scale, enable_gqa,
        window=window, causal_alignment=causal_alignment, return_lse=return_lse, softcap=softcap,
        alibi_slopes=alibi_slopes, sinks=sinks, return_dropout_mask=return_dropout_mask,
        backend=backend)
    if not (return_lse or return_dropout_mask):
        return out.reshape(*query.shape[:-1], out.shape[-1])
    outs = [out[0].reshape(*query.shape[:-1], out[0].shape[-1])]
    if return_lse:
        outs.append(out[1].reshape(query.shape[:-1]))
    if return_dropout_mask:  # (B, H, L, S) -> (..., L, S)
        keep = out[-1]
        outs.append(None if keep is None else keep.reshape(*query.shape[:-1], key.shape[-2]))
    return tuple(outs)


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
    backend: str = "auto",
):
    """Decoding attention against a KV cache (flash-decoding on GPU).

    Args:
        q: (B, H, Lq, E) new queries: the last Lq positions of each sequence after the append.
        k_cache, v_cache: (B, Hkv, capacity, E), H % Hkv == 0; with block_table the paged pool
            (num_blocks, Hkv, block_size, E), block_size a multiple of 16. Updated in place when
            k_new is given.
        cache_seqlens: int32 (B,), tokens already in the cache per sequence.
        k_new, v_new: (B, Hkv, Lnew, E) or None, any Lnew (not only Lq, as FlashAttention's
            ``flash_attn_with_kvcache``); written at positions [cache_seqlens[b], +Lnew).
        causal: query i of sequence b (at position total_b - Lq + i, total_b = cache_seqlens[b]
            + Lnew) sees keys up to its own position (bottom-right causal).
        cache_leftpad: int32 (B,) or None: sequence b starts at cache position cache_leftpad[b]
            (left-padded batches, as ``generate()`` pads them); the keys before it are not seen.
        rotary_cos, rotary_sin: (max_pos, rotary_dim / 2) tables in q's dtype or float32, any
            strides (e.g. ``torch.outer(arange(max_pos), inv_freq).cos()`` for Llama), or None.
            Requires k_new/v_new. Rotary embedding fused into the call (FlashAttention's
            ``flash_attn_with_kvcache``): k_new token i of sequence b is rotated at position
            ``cache_seqlens[b] - cache_leftpad[b] + i`` and q token i at
            ``total_b - Lq - cache_leftpad[b] + i`` (its position in its own sequence: left
            padding does not count, as transformers' ``position_ids`` of a left-padded batch;
            padding tokens among the new ones, before cache_leftpad[b], are rotated at position
            0 and never attended to), which must be < max_pos. The first rotary_dim dims of each
            head are rotated, the rest pass through; computed in float32 and rounded to q's
            dtype. k_new is rotated before it is written (the cache holds rotated keys, as
            transformers' caches do); v_new is not rotated; q and k_new themselves are left
            unchanged.
        rotary_interleaved: False: GPT-NeoX / Llama pairs (j, j + rotary_dim/2) (transformers'
            ``rotate_half``); True: GPT-J pairs (2j, 2j + 1). For a pair (x1, x2), c = cos[p, j],
            s = sin[p, j]: (x1 c - x2 s, x2 c + x1 s).
        softcap, alibi_slopes, sinks: as in scaled_dot_product_attention, the queries being the
            last Lq positions of each sequence (bottom-right); the ALiBi distance is taken in
            cache positions (left padding does not change it). Inference only.
        window: (left, right) or None: as scaled_dot_product_attention's window, bottom-right
            aligned inside the cache: query i sees keys j with
            total_b - Lq + i - left <= j <= total_b - Lq + i + right (-1: unbounded). Sliding-
            window models (Mistral, Gemma-2/3) decode through the cache with it.
        return_lse: also return lse (B, H, Lq) float32, the log-sum-exp of each row's scaled,
            modified, masked scores (the sink included; -inf for a row with no visible key), as
            scaled_dot_product_attention's return_lse.
        block_table: int32 (B, max_blocks) or None: the paged cache (vLLM / FlashAttention's
            ``block_table``): token t of sequence b lives in block block_table[b, t // block_size],
            slot t % block_size of k_cache/v_cache; k_new/v_new are written there. The entries
            of the blocks holding tokens [0, total_b) must index the pool (checked for host
            tensors; GPU kernels clamp them); the others are never read.

    Every tensor may be strided (e.g. q, k_new, v_new as transposed views of a fused qkv
    projection's (B, Lq, (H + 2 Hkv) E) output); nothing is copied for it on the CPU.

    Returns:
        (B, H, Lq, Ev) in q's dtype; (out, lse) with return_lse.
    """
    cap = _softcap_arg("fastattn.attention_with_kvcache", softcap)
    score_mods = cap > 0.0 or alibi_slopes is not None or sinks is not None
    wl, wr = _kv_window(window)
    if not score_mods and _backend.fast_path(backend):
        out = _backend.NATIVE.kvcache(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale,
                                      causal, cache_leftpad, rotary_cos, rotary_sin,
                                      rotary_interleaved, block_table, wl, wr, return_lse)
        if out is not None:
            return out
    _backend.check_backend(backend)
    return_lse = bool(return_lse)
    scale = _check_kvcache(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale,
                           cache_leftpad, rotary_cos, rotary_sin, cap, alibi_slopes, sinks,
                           block_table, wl, wr)
    E = q.shape[-1]
    rotary = rotary_cos is not None or rotary_sin is not None
    paged = block_table is not None
    windowed = wl >= 0 or wr >= 0
    lnew_differs = k_new is not None and k_new.shape[2] != q.shape[2]
    chosen = _backend.pick("attention_with_kvcache", q.device, backend,
                           (q.dtype, max(E, v_cache.shape[-1]), rotary, score_mods, paged,
                            windowed, return_lse, lnew_differs),
                           _kvcache_supports)
    if chosen == "reference" or q.numel() == 0:
        out = reference.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, k_new, v_new,
                                               scale=scale, causal=causal,
                                               cache_leftpad=cache_leftpad,
                                               rotary_cos=rotary_cos, rotary_sin=rotary_sin,
                                               rotary_interleaved=rotary_interleaved,
                                               softcap=softcap, alibi_slopes=alibi_slopes,
                                               sinks=sinks, window=window, return_lse=return_lse,
                                               block_table=block_table)
        return (out[0], out[1].float()) if return_lse else out
    if return_lse:
        op = (torch.ops.fastattn.triton_attention_kvcache_lse if chosen == "triton"
              else torch.ops.fastattn.attention_kvcache_lse)
    else:
        op = (torch.ops.fastattn.triton_attention_kvcache if chosen == "triton"
              else torch.ops.fastattn.attention_kvcache)
    if paged or windowed or return_lse:
        return op(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale, bool(causal),
                  cache_leftpad, rotary_cos, rotary_sin, bool(rotary_interleaved), cap,
                  alibi_slopes, sinks, block_table, wl, wr)
    if not score_mods:
        return op(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale, bool(causal),
                  cache_leftpad, rotary_cos, rotary_sin, bool(rotary_interleaved))
    return op(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale, bool(causal),
              cache_leftpad, rotary_cos, rotary_sin, bool(rotary_interleaved), cap,
              alibi_slopes, sinks)


# ---------------------------------------------------------------------------------------------
# attention_varlen: packed variable-length sequences (FlashAttention's flash_attn_varlen_func)
# ---------------------------------------------------------------------------------------------
_backend.register_op("attention_varlen", "attention_varlen_fwd")


def _varlen_supports(backend: str, device: torch.device, key: tuple) -> str | None:
    """_supports for attention_varlen (same key): the CUDA kernels, like their sdpa ones, refuse
    dropout and softcap / alibi_slopes / sinks."""
    return _supports(backend, device, key)


def _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                  dropout_p: float, softcap: float, alibi_slopes, sinks) -> float:
    """attention_varlen's argument rules (csrc/checks.cpp: check_varlen, which also checks the
    cu_seqlens values where they are on the host) -> the scale resolved. While torch.compile
    traces, and without the extension, the shape rules are checked here instead."""
    fn = "fastattn.attention_varlen"
    for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(m, bool) or not isinstance(m, (int, torch.SymInt)):
            raise TypeError(f"{fn}: {name} must be an int, got {type(m).__name__}")
    for name, t in (("q", q), ("k", k), ("v", v), ("cu_seqlens_q", cu_seqlens_q),
                    ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if _backend.NATIVE is not None and not torch.compiler.is_compiling():
        return _backend.NATIVE.check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                            max_seqlen_k, scale, dropout_p, softcap,
                                            alibi_slopes, sinks)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 3:
            raise ValueError(f"{fn}: {name} must be 3-D (total, heads, head dim), got shape "
                             f"{list(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{fn}: {name} must be a floating-point tensor, got {t.dtype}")
        if t.dtype != q.dtype:
            raise TypeError(f"{fn}: {name} must have q's dtype ({q.dtype}), got {t.dtype}")
        if t.device != q.device:
            raise RuntimeError(f"{fn}: {name} must be on the same device as q ({q.device}), got "
                               f"{t.device}")
    if k.shape[2] != q.shape[2] or v.shape[:2] != k.shape[:2]:
        raise ValueError(f"{fn}: k must be (total_k, Hkv, E={q.shape[2]}) and v (total_k, Hkv, "
                         f"Ev), got k {list(k.shape)}, v {list(v.shape)}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"{fn}: q heads (q.shape[1] = {q.shape[1]}) must be a multiple of the "
                         f"k/v heads (k.shape[1] = {k.shape[1]})")
    for name, t in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if t.dtype != torch.int32 or t.dim() != 1 or t.shape[0] < 1:
            raise TypeError(f"{fn}: {name} must be an int32 tensor of shape (B + 1,), got "
                            f"{t.dtype} {list(t.shape)}")
        if t.device != q.device:
            raise RuntimeError(f"{fn}: {name} must be on the same device as q ({q.device}), got "
                               f"{t.device}")
    if cu_seqlens_k.shape[0] != cu_seqlens_q.shape[0]:
        raise ValueError(f"{fn}: cu_seqlens_k must have cu_seqlens_q's shape "
                         f"({cu_seqlens_q.shape[0]},), got {list(cu_seqlens_k.shape)}")
    _check_score_mods(fn, _VarlenHeads(cu_seqlens_q.shape[0] - 1, q.shape[1], q.device),
                      alibi_slopes, sinks)
    return _check_scale(scale, q.shape[-1])


class _VarlenHeads:
    """The (B, H) and device _check_score_mods reads from a query (B = the sequences)."""

    def __init__(self, B, H, device):
        self.shape = (B, H)
        self.device = device


@torch.library.custom_op("fastattn::triton_attention_varlen_fwd", mutates_args=())
def triton_attention_varlen_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, scale: float,
    window_left: int, window_right: int, bottom_right: bool, dropout_p: float, seed: int,
    softcap: float = 0.0, alibi_slopes: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    from fastattn.triton.attention import attention_varlen_fwd

    return attention_varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                scale, window_left, window_right, bottom_right, dropout_p, seed,
                                softcap, alibi_slopes, sinks)


@torch.library.custom_op("fastattn::triton_attention_varlen_bwd", mutates_args=())
def triton_attention_varlen_bwd(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor, grad_lse: torch.Tensor | None,
    cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int,
    max_seqlen_k: int, scale: float, window_left: int, window_right: int, bottom_right: bool,
    dropout_p: float, seed: int, deterministic: bool, softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None, sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from fastattn.triton.attention import attention_varlen_bwd

    return attention_varlen_bwd(grad_out, q, k, v, out, lse, grad_lse, cu_seqlens_q,
                                cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window_left,
                                window_right, bottom_right, dropout_p, seed, deterministic,
                                softcap, alibi_slopes, sinks)


def _varlen_fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                     window_left, window_right, bottom_right, dropout_p, seed, softcap=0.0,
                     alibi_slopes=None, sinks=None):
    total_q, H, _ = q.shape
    out = q.new_empty((total_q, H, v.shape[-1]))
    lse = q.new_empty((H, total_q), dtype=torch.float32)
    return out, lse


def _varlen_bwd_fake(grad_out, q, k, v, out, lse, grad_lse, cu_seqlens_q, cu_seqlens_k,
                     max_seqlen_q, max_seqlen_k, scale, window_left, window_right, bottom_right,
                     dropout_p, seed, deterministic, softcap=0.0, alibi_slopes=None, sinks=None):
    # the kernels write (heads, total, dim) rows: (total, heads, dim) views of them
    dq = q.new_empty((q.shape[1], q.shape[0], q.shape[2])).transpose(0, 1)
    dk = k.new_empty((k.shape[1], k.shape[0], k.shape[2])).transpose(0, 1)
    dv = v.new_empty((v.shape[1], v.shape[0], v.shape[2])).transpose(0, 1)
    dsinks = q.new_empty((q.shape[1] if sinks is not None else 0,), dtype=torch.float32)
    return dq, dk, dv, dsinks


def _varlen_setup_context(ctx, inputs, output):
    (q, k, v, cu_q, cu_k, max_q, max_k, scale, wl, wr, br, dropout_p, seed, softcap,
     alibi_slopes, sinks) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, alibi_slopes, sinks)
    ctx.args = (max_q, max_k, scale, wl, wr, br, dropout_p, seed)
    ctx.softcap = softcap


def _make_varlen_backward(bwd_op):
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, cu_q, cu_k, alibi_slopes, sinks = ctx.saved_tensors
        dq, dk, dv, dsinks = bwd_op(
            grad_out, q, k, v, out, lse, grad_lse, cu_q, cu_k, *ctx.args,
            torch.are_deterministic_algorithms_enabled(), ctx.softcap, alibi_slopes, sinks)
        # (no gradient for the offsets, the ints and the slopes, as in FlashAttention)
        return (dq, dk, dv) + (None,) * 12 + (dsinks if sinks is not None else None,)

    return backward


torch.library.register_fake("fastattn::triton_attention_varlen_fwd")(_varlen_fwd_fake)
torch.library.register_fake("fastattn::triton_attention_varlen_bwd")(_varlen_bwd_fake)
torch.library.register_autograd("fastattn::triton_attention_varlen_fwd",
                                _make_varlen_backward(triton_attention_varlen_bwd),
                                setup_context=_varlen_setup_context)


def _register_varlen_cpp() -> None:
    if not (_backend._load_extension()[0]
            and hasattr(torch.ops.fastattn, "attention_varlen_fwd")):
        return
    torch.library.register_fake("fastattn::attention_varlen_fwd")(_varlen_fwd_fake)
    torch.library.register_fake("fastattn::attention_varlen_bwd")(_varlen_bwd_fake)
    torch.library.register_autograd("fastattn::attention_varlen_fwd",
                                    _make_varlen_backward(torch.ops.fastattn.attention_varlen_bwd),
                                    setup_context=_varlen_setup_context)


_register_varlen_cpp()


def attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
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
    return_dropout_mask: bool = False,
    backend: str = "auto",
):
    """Attention over packed variable-length sequences (FlashAttention's
    ``flash_attn_varlen_func``; padding-free training and batched prefill).

    Args:
        q: (total_q, H, E) float16/bfloat16/float32: the query rows of every sequence, packed.
        k: (total_k, Hkv, E); v: (total_k, Hkv, Ev), H % Hkv == 0 (GQA: head h reads kv head
            h // (H / Hkv)).
        cu_seqlens_q, cu_seqlens_k: int32 (B + 1,) on q's device: 0 first, non-decreasing, the
            packed length last. Sequence b is q[cu_seqlens_q[b]:cu_seqlens_q[b + 1]] against
            k/v[cu_seqlens_k[b]:cu_seqlens_k[b + 1]] (either may be empty).
        max_seqlen_q, max_seqlen_k: ints >= the longest sequence's query / key count (the GPU
            launch is sized by them; checked against cu_seqlens where those are on the CPU).
        dropout_p, is_causal, scale, window, causal_alignment, softcap, sinks: exactly
            scaled_dot_product_attention's, per sequence (L_b x S_b; "bottom_right" aligns the
            last query of each sequence with its last key).
        alibi_slopes: float32 (H,) or (B, H) (row b for sequence b), or None.
        return_lse: also return lse (H, total_q) float32 (the sink included; -inf on rows that
            see no key).
        return_dropout_mask: also return the dropout keep mask the kernels drew, as
            scaled_dot_product_attention's, packed: bool (total_q, H, max_seqlen_k), [r, h, j]
            the flag of query row r for key j of its own sequence (False for j past the
            sequence's keys); None when dropout_p = 0.
        backend: "auto" | "triton" | "cuda" | "cpu" | "reference" ("cuda": no dropout, softcap,
            alibi_slopes or sinks).

    Set ``torch.use_deterministic_algorithms(True)`` for a bitwise-repeatable backward.

    Returns:
        out (total_q, H, Ev) in q's dtype [, lse when return_lse] [, the keep mask when
        return_dropout_mask]. Gradients reach q, k, v and sinks.
    """
    fn = "fastattn.attention_varlen"
    _backend.check_backend(backend)
    cap = _softcap_arg(fn, softcap)
    if (isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float))
            or not 0.0 <= dropout_p < 1.0):
        raise ValueError(f"{fn}: dropout_p must be in [0, 1), got {dropout_p!r}")
    dropout_p = float(dropout_p)
    scale = _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                          dropout_p, cap, alibi_slopes, sinks)
    wl, wr, _ = _window_args(0, 0, is_causal, window, causal_alignment)
    score_mods = cap > 0.0 or alibi_slopes is not None or sinks is not None
    E, Ev = q.shape[-1], v.shape[-1]
    chosen = _backend.pick("attention_varlen", q.device, backend,
                           (q.dtype, max(E, Ev), dropout_p > 0.0, score_mods), _varlen_supports)
    # (no key at all, total_k = 0, is the kernels' too: out 0, lse the sink, zero gradients)
    if chosen == "reference" or q.numel() == 0 or Ev == 0:
        out, lse, *keep = reference.attention_varlen(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
            dropout_p=dropout_p, is_causal=is_causal, scale=scale, window=window,
            causal_alignment=causal_alignment, softcap=softcap, alibi_slopes=alibi_slopes,
            sinks=sinks, return_lse=True, return_dropout_mask=return_dropout_mask)
        return _outputs(out, lse.float(), *keep, return_lse=return_lse)
    op = (torch.ops.fastattn.triton_attention_varlen_fwd if chosen == "triton"
          else torch.ops.fastattn.attention_varlen_fwd)
    B, H = cu_seqlens_q.shape[0] - 1, q.shape[1]
    seed = _draw_seed(dropout_p)
    out, lse = op(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k),
                  scale, wl, wr, causal_alignment == "bottom_right", dropout_p, seed, cap,
                  _slopes_bh(alibi_slopes, B, H), None if sinks is None else sinks.contiguous())
    if return_dropout_mask:
        keep = _dropout_keep_mask(chosen, q, k, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q),
                                  int(max_seqlen_k), dropout_p, seed)
        return _outputs(out, lse, keep, return_lse=return_lse)
    return (out, lse) if return_lse else out
