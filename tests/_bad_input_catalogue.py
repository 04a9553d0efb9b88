"""Catalogue of invalid calls and valid edge cases of every public fastattn function and module.

Run as a script (a kernel crash then ends this process, not pytest):

    python tests/_bad_input_catalogue.py [--backends reference,cpu,triton] [--after BACKEND/ID]

For each backend and entry it prints ``START <backend>/<id>`` before the call and
``RESULT <json>`` after, with status "pass", "fail" (and why) or "skip" (and why: the function
is not in the package yet, or the backend cannot run it here). ``--after`` resumes after an
entry that crashed the process. tests/test_bad_input.py drives it (one process for all
backends: importing torch is the slow part) and turns each entry into one test.

Invalid entries must raise the stated exception type with a message containing the stated
substring (the argument's name, or what is wrong with it). Valid entries must run and return the
defined result documented in tests/test_bad_input.py; they assert it themselves.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's fastattn
os.environ.setdefault("TRITON_INTERPRET", "1")  # as tests/conftest.py: Triton runs on CPU tensors

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from helpers import assert_close_rule  # noqa: E402
from test_reliability import BACKENDS, op_unavailable  # noqa: E402
from torch import nn  # noqa: E402

import fastattn  # noqa: E402
from fastattn import reference  # noqa: E402

META = torch.device("meta")  # the "other device" of the device-mismatch entries


@dataclass(frozen=True)
class Entry:
    id: str
    target: str  # "scaled_dot_product_attention", ..., "nn.LayerNorm", "convert"
    fn: Callable[[str], object]  # called with the backend
    raises: tuple[type[BaseException], ...] | None  # None: a valid call
    match: str | None
    backends: tuple[str, ...]
    uses: str  # the op whose availability on the backend decides whether the entry runs


ENTRIES: list[Entry] = []

# the public op a module or convert() runs, for the backend availability check
_MODULE_OPS = {
    "nn.MultiheadAttention": "scaled_dot_product_attention",
    "nn.LayerNorm": "layer_norm",
    "nn.RMSNorm": "rms_norm",
    "nn.Int8Linear": "int8_linear",
    "convert": "scaled_dot_product_attention",
}


def bad(id: str, target: str, raises, match: str, *, backends=BACKENDS):
    """Register an invalid call: it must raise ``raises`` with ``match`` in the message."""
    raises = raises if isinstance(raises, tuple) else (raises,)

    def register(fn):
        ENTRIES.append(Entry(id, target, fn, raises, match, tuple(backends),
                             _MODULE_OPS.get(target, target)))
        return fn

    return register


def edge(id: str, target: str, *, backends=BACKENDS):
    """Register a valid edge case: it must run and pass its own assertions."""

    def register(fn):
        ENTRIES.append(Entry(id, target, fn, None, None, tuple(backends),
                             _MODULE_OPS.get(target, target)))
        return fn

    return register


def target_unavailable(target: str) -> str | None:
    if target.startswith("nn."):
        try:
            getattr(fastattn.nn, target[3:])
        except (ImportError, AttributeError) as e:
            return f"fastattn.{target} is missing: the module is not in the package yet ({e})"
        return None
    if target == "convert":
        try:
            fastattn.convert  # noqa: B018
        except (ImportError, AttributeError) as e:
            return f"fastattn.convert is missing: the function is not in the package yet ({e})"
        return None
    if not hasattr(fastattn, target):
        return f"fastattn.{target} is missing: the function is not in the package yet"
    return None


def rn(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(shape, dtype=dtype, device=device)


def i8(*shape, device="cpu"):
    return torch.randint(-127, 128, shape, dtype=torch.int8, device=device)


# =============================================================================================
# invalid calls
# =============================================================================================
# ---- scaled_dot_product_attention: q (1, 2, 8, 16) -------------------------------------------
SDPA = "scaled_dot_product_attention"


def sdpa(backend, q=None, k=None, v=None, **kw):
    q = rn(1, 2, 8, 16) if q is None else q
    k = rn(1, 2, 8, 16) if k is None else k
    v = rn(1, 2, 8, 16) if v is None else v
    return fastattn.scaled_dot_product_attention(q, k, v, backend=backend, **kw)


# F.scaled_dot_product_attention takes any (..., L, E) of rank >= 3 and raises RuntimeError
# otherwise, and for a rank or dtype mismatch: the drop-in raises the same kind
bad("sdpa_query_2d", SDPA, RuntimeError, "query")(lambda b: sdpa(b, q=rn(8, 16)))
bad("sdpa_query_3d_key_4d", SDPA, RuntimeError, "dimensions")(lambda b: sdpa(b, q=rn(2, 8, 16)))
bad("sdpa_key_5d", SDPA, RuntimeError, "dimensions")(lambda b: sdpa(b, k=rn(1, 1, 2, 8, 16)))
bad("sdpa_value_not_tensor", SDPA, TypeError, "value")(lambda b: sdpa(b, v=[[1.0]]))
bad("sdpa_query_int", SDPA, TypeError, "query")(
    lambda b: sdpa(b, q=torch.ones(1, 2, 8, 16, dtype=torch.int64)))
bad("sdpa_mixed_dtypes", SDPA, RuntimeError, "key.dtype")(
    lambda b: sdpa(b, k=rn(1, 2, 8, 16, dtype=torch.float16)))
bad("sdpa_key_on_other_device", SDPA, RuntimeError, "key")(
    lambda b: sdpa(b, k=rn(1, 2, 8, 16, device=META)))
bad("sdpa_batch_mismatch", SDPA, ValueError, "batch")(lambda b: sdpa(b, k=rn(2, 2, 8, 16),
                                                                     v=rn(2, 2, 8, 16)))
bad("sdpa_head_dim_mismatch", SDPA, ValueError, "key.shape[-1]")(
    lambda b: sdpa(b, k=rn(1, 2, 8, 24)))
bad("sdpa_kv_length_mismatch", SDPA, ValueError, "value.shape[2]")(
    lambda b: sdpa(b, v=rn(1, 2, 9, 16)))
bad("sdpa_heads_without_gqa", SDPA, ValueError, "enable_gqa")(
    lambda b: sdpa(b, k=rn(1, 1, 8, 16), v=rn(1, 1, 8, 16)))
bad("sdpa_gqa_heads_not_multiple", SDPA, ValueError, "heads")(
    lambda b: sdpa(b, q=rn(1, 3, 8, 16), k=rn(1, 2, 8, 16), v=rn(1, 2, 8, 16), enable_gqa=True))
bad("sdpa_gqa_zero_kv_heads", SDPA, ValueError, "heads")(
    lambda b: sdpa(b, k=rn(1, 0, 8, 16), v=rn(1, 0, 8, 16), enable_gqa=True))
bad("sdpa_mask_wrong_shape", SDPA, ValueError, "attn_mask")(
    lambda b: sdpa(b, attn_mask=torch.ones(3, 8, dtype=torch.bool)))
bad("sdpa_mask_too_many_dims", SDPA, ValueError, "attn_mask")(
    lambda b: sdpa(b, attn_mask=torch.ones(2, 1, 2, 8, 8, dtype=torch.bool)))
bad("sdpa_mask_int_dtype", SDPA, TypeError, "attn_mask")(
    lambda b: sdpa(b, attn_mask=torch.ones(8, 8, dtype=torch.int64)))
bad("sdpa_mask_float64_for_float32", SDPA, TypeError, "attn_mask")(
    lambda b: sdpa(b, attn_mask=rn(8, 8, dtype=torch.float64)))
bad("sdpa_mask_on_other_device", SDPA, RuntimeError, "attn_mask")(
    lambda b: sdpa(b, attn_mask=torch.ones(8, 8, dtype=torch.bool, device=META)))
bad("sdpa_mask_not_tensor", SDPA, TypeError, "attn_mask")(
    lambda b: sdpa(b, attn_mask=[[True] * 8] * 8))
bad("sdpa_dropout_negative", SDPA, ValueError, "dropout_p")(lambda b: sdpa(b, dropout_p=-0.1))
bad("sdpa_dropout_one", SDPA, ValueError, "dropout_p")(lambda b: sdpa(b, dropout_p=1.0))
bad("sdpa_dropout_nan", SDPA, ValueError, "dropout_p")(lambda b: sdpa(b, dropout_p=float("nan")))
bad("sdpa_scale_nan", SDPA, ValueError, "scale")(lambda b: sdpa(b, scale=float("nan")))
bad("sdpa_scale_inf", SDPA, ValueError, "scale")(lambda b: sdpa(b, scale=float("-inf")))
bad("sdpa_window_below_minus_one", SDPA, ValueError, "window")(lambda b: sdpa(b, window=(-2, 0)))
bad("sdpa_window_float", SDPA, TypeError, "window")(lambda b: sdpa(b, window=(1.5, 2)))
bad("sdpa_window_three_values", SDPA, TypeError, "window")(lambda b: sdpa(b, window=(1, 2, 3)))
bad("sdpa_bad_causal_alignment", SDPA, ValueError, "causal_alignment")(
    lambda b: sdpa(b, is_causal=True, causal_alignment="center"))
bad("sdpa_bad_backend_string", SDPA, ValueError, "backend", backends=("reference",))(
    lambda b: sdpa("fast"))
bad("sdpa_backend_not_a_string", SDPA, ValueError, "backend", backends=("reference",))(
    lambda b: sdpa(None))
# the kernels cover float16/bfloat16/float32 and head dims up to 256; an explicit backend must
# say so rather than run (float64 and larger heads run on backend="reference")
bad("sdpa_float64_on_kernel_backend", SDPA, RuntimeError, "dtype", backends=("cpu", "triton"))(
    lambda b: sdpa(b, q=rn(1, 2, 8, 16, dtype=torch.float64), k=rn(1, 2, 8, 16, dtype=torch.float64),
                   v=rn(1, 2, 8, 16, dtype=torch.float64)))
bad("sdpa_head_dim_512_on_kernel_backend", SDPA, RuntimeError, "head dim",
    backends=("cpu", "triton"))(
    lambda b: sdpa(b, q=rn(1, 1, 4, 512), k=rn(1, 1, 4, 512), v=rn(1, 1, 4, 512)))

# score modifiers: softcap a float > 0, alibi_slopes float32 (H,) or (B, H), sinks float32 (H,)
bad("sdpa_softcap_zero", SDPA, ValueError, "softcap")(lambda b: sdpa(b, softcap=0.0))
bad("sdpa_softcap_negative", SDPA, ValueError, "softcap")(lambda b: sdpa(b, softcap=-30.0))
bad("sdpa_softcap_nan", SDPA, ValueError, "softcap")(lambda b: sdpa(b, softcap=float("nan")))
bad("sdpa_softcap_tensor", SDPA, TypeError, "softcap")(
    lambda b: sdpa(b, softcap=torch.tensor(30.0)))
bad("sdpa_alibi_wrong_shape", SDPA, ValueError, "alibi_slopes")(
    lambda b: sdpa(b, alibi_slopes=rn(3)))
bad("sdpa_alibi_float16", SDPA, TypeError, "alibi_slopes")(
    lambda b: sdpa(b, alibi_slopes=rn(2, dtype=torch.float16)))
bad("sdpa_alibi_on_other_device", SDPA, RuntimeError, "alibi_slopes")(
    lambda b: sdpa(b, alibi_slopes=rn(1, 2, device=META)))
bad("sdpa_sinks_wrong_shape", SDPA, ValueError, "sinks")(lambda b: sdpa(b, sinks=rn(1, 2)))
bad("sdpa_sinks_float64", SDPA, TypeError, "sinks")(
    lambda b: sdpa(b, sinks=rn(2, dtype=torch.float64)))
bad("sdpa_sinks_not_tensor", SDPA, TypeError, "sinks")(lambda b: sdpa(b, sinks=[0.5, 0.5]))
bad("sdpa_sinks_on_other_device", SDPA, RuntimeError, "sinks")(
    lambda b: sdpa(b, sinks=rn(2, device=META)))

# ---- attention_with_kvcache: q (2, 2, 1, 16), caches (2, 2, 8, 16), seqlens [3, 5] -------------
KV = "attention_with_kvcache"


def kvc(backend, q=None, kc=None, vc=None, seqlens=None, k_new=None, v_new=None, **kw):
    q = rn(2, 2, 1, 16) if q is None else q
    kc = rn(2, 2, 8, 16) if kc is None else kc
    vc = rn(2, 2, 8, 16) if vc is None else vc
    seqlens = torch.tensor([3, 5], dtype=torch.int32) if seqlens is None else seqlens
    return fastattn.attention_with_kvcache(q, kc, vc, seqlens, k_new, v_new, backend=backend, **kw)


bad("kv_q_3d", KV, ValueError, "q")(lambda b: kvc(b, q=rn(2, 1, 16)))
bad("kv_q_int", KV, TypeError, "q")(lambda b: kvc(b, q=torch.ones(2, 2, 1, 16, dtype=torch.int32)))
bad("kv_cache_dtype_mismatch", KV, TypeError, "k_cache")(
    lambda b: kvc(b, kc=rn(2, 2, 8, 16, dtype=torch.bfloat16),
                  vc=rn(2, 2, 8, 16, dtype=torch.bfloat16)))
bad("kv_v_cache_shape_mismatch", KV, ValueError, "v_cache")(lambda b: kvc(b, vc=rn(2, 2, 7, 16)))
bad("kv_cache_head_dim_mismatch", KV, ValueError, "k_cache")(
    lambda b: kvc(b, kc=rn(2, 2, 8, 8), vc=rn(2, 2, 8, 8)))
bad("kv_cache_heads_not_divisor", KV, ValueError, "heads")(
    lambda b: kvc(b, kc=rn(2, 3, 8, 16), vc=rn(2, 3, 8, 16)))
bad("kv_cache_on_other_device", KV, RuntimeError, "k_cache")(
    lambda b: kvc(b, kc=rn(2, 2, 8, 16, device=META)))
bad("kv_seqlens_int64", KV, TypeError, "cache_seqlens")(
    lambda b: kvc(b, seqlens=torch.tensor([3, 5])))
bad("kv_seqlens_list", KV, TypeError, "cache_seqlens")(lambda b: kvc(b, seqlens=[3, 5]))
bad("kv_seqlens_wrong_shape", KV, ValueError, "cache_seqlens")(
    lambda b: kvc(b, seqlens=torch.tensor([3, 5, 1], dtype=torch.int32)))
bad("kv_seqlens_negative", KV, ValueError, "cache_seqlens")(
    lambda b: kvc(b, seqlens=torch.tensor([-1, 5], dtype=torch.int32)))
bad("kv_seqlens_beyond_capacity", KV, ValueError, "cache_seqlens")(
    lambda b: kvc(b, seqlens=torch.tensor([3, 9], dtype=torch.int32)))
bad("kv_new_tokens_overflow_capacity", KV, ValueError, "cache_seqlens")(
    lambda b: kvc(b, seqlens=torch.tensor([3, 8], dtype=torch.int32),
                  k_new=rn(2, 2, 1, 16), v_new=rn(2, 2, 1, 16)))
bad("kv_zero_capacity_with_new_tokens", KV, ValueError, "cache_seqlens")(
    lambda b: kvc(b, kc=rn(2, 2, 0, 16), vc=rn(2, 2, 0, 16),
                  seqlens=torch.zeros(2, dtype=torch.int32), k_new=rn(2, 2, 1, 16),
                  v_new=rn(2, 2, 1, 16)))
bad("kv_k_new_without_v_new", KV, ValueError, "v_new")(lambda b: kvc(b, k_new=rn(2, 2, 1, 16)))
bad("kv_k_new_wrong_shape", KV, ValueError, "k_new")(
    lambda b: kvc(b, k_new=rn(2, 2, 2, 8), v_new=rn(2, 2, 2, 16)))
bad("kv_v_new_other_length", KV, ValueError, "v_new")(  # Lnew is k_new's: v_new must match it
    lambda b: kvc(b, k_new=rn(2, 2, 2, 16), v_new=rn(2, 2, 1, 16)))
bad("kv_v_new_wrong_dtype", KV, TypeError, "v_new")(
    lambda b: kvc(b, k_new=rn(2, 2, 1, 16), v_new=rn(2, 2, 1, 16, dtype=torch.float16)))
bad("kv_scale_nan", KV, ValueError, "scale")(lambda b: kvc(b, scale=float("nan")))
bad("kv_bad_backend_string", KV, ValueError, "backend", backends=("reference",))(
    lambda b: kvc("gpu"))
bad("kv_softcap_negative", KV, ValueError, "softcap")(lambda b: kvc(b, softcap=-1.0))
bad("kv_softcap_inf", KV, ValueError, "softcap")(lambda b: kvc(b, softcap=float("inf")))
bad("kv_alibi_wrong_shape", KV, ValueError, "alibi_slopes")(
    lambda b: kvc(b, alibi_slopes=rn(2, 3)))
bad("kv_alibi_bfloat16", KV, TypeError, "alibi_slopes")(
    lambda b: kvc(b, alibi_slopes=rn(2, dtype=torch.bfloat16)))
bad("kv_sinks_wrong_shape", KV, ValueError, "sinks")(lambda b: kvc(b, sinks=rn(4)))
bad("kv_sinks_int", KV, TypeError, "sinks")(
    lambda b: kvc(b, sinks=torch.zeros(2, dtype=torch.int32)))
bad("kv_sinks_on_other_device", KV, RuntimeError, "sinks")(
    lambda b: kvc(b, sinks=rn(2, device=META)))


# rotary embedding: tables (max_pos, rotary_dim / 2), with k_new/v_new (B, Hkv, 1, E)
def kvr(backend, cos=None, sin=None, E=16, new=True, **kw):
    half = E // 2
    cos = rn(16, half) if cos is None else cos
    sin = rn(*cos.shape) if sin is None else sin
    nkw = dict(k_new=rn(2, 2, 1, E), v_new=rn(2, 2, 1, E)) if new else {}
    return kvc(backend, q=rn(2, 2, 1, E), kc=rn(2, 2, 8, E), vc=rn(2, 2, 8, E),
               rotary_cos=cos, rotary_sin=sin, **nkw, **kw)


bad("kv_rotary_cos_1d", KV, ValueError, "rotary_cos")(lambda b: kvr(b, cos=rn(64), sin=rn(64)))
bad("kv_rotary_sin_shape_differs", KV, ValueError, "rotary_sin")(
    lambda b: kvr(b, cos=rn(16, 8), sin=rn(16, 4)))
bad("kv_rotary_without_k_new", KV, ValueError, "k_new")(lambda b: kvr(b, new=False))
bad("kv_rotary_cos_without_sin", KV, ValueError, "rotary_sin")(
    lambda b: kvc(b, k_new=rn(2, 2, 1, 16), v_new=rn(2, 2, 1, 16), rotary_cos=rn(16, 8)))
bad("kv_rotary_sin_without_cos", KV, ValueError, "rotary_cos")(
    lambda b: kvc(b, k_new=rn(2, 2, 1, 16), v_new=rn(2, 2, 1, 16), rotary_sin=rn(16, 8)))
# an odd head dim rotated whole: rotary_dim = 2 * 8 = 16 > E = 15
bad("kv_rotary_odd_rotary_dim", KV, ValueError, "rotary_cos")(
    lambda b: kvr(b, cos=rn(16, 8), E=15))
bad("kv_rotary_dim_above_head_dim", KV, ValueError, "rotary_cos")(
    lambda b: kvr(b, cos=rn(16, 16)))  # transformers' (max_pos, E) table: rotary_dim 2E
bad("kv_rotary_empty_table", KV, ValueError, "rotary_cos")(lambda b: kvr(b, cos=rn(0, 8)))
# seqlens [3, 5] + 1 new token: position 5 needs 6 rows
bad("kv_rotary_position_beyond_max_pos", KV, ValueError, "rotary_cos")(
    lambda b: kvr(b, cos=rn(5, 8)))
bad("kv_rotary_cos_int", KV, TypeError, "rotary_cos")(
    lambda b: kvr(b, cos=torch.ones(16, 8, dtype=torch.int32), sin=rn(16, 8)))
bad("kv_rotary_cos_float64_for_float32_q", KV, TypeError, "rotary_cos")(
    lambda b: kvr(b, cos=rn(16, 8, dtype=torch.float64), sin=rn(16, 8, dtype=torch.float64)))
bad("kv_rotary_sin_dtype_differs", KV, TypeError, "rotary_sin")(
    lambda b: kvc(b, q=rn(2, 2, 1, 16, dtype=torch.bfloat16),
                  kc=rn(2, 2, 8, 16, dtype=torch.bfloat16), vc=rn(2, 2, 8, 16, dtype=torch.bfloat16),
                  k_new=rn(2, 2, 1, 16, dtype=torch.bfloat16),
                  v_new=rn(2, 2, 1, 16, dtype=torch.bfloat16), rotary_cos=rn(16, 8),
                  rotary_sin=rn(16, 8, dtype=torch.bfloat16)))
bad("kv_rotary_cos_on_other_device", KV, RuntimeError, "rotary_cos")(
    lambda b: kvr(b, cos=rn(16, 8, device=META), sin=rn(16, 8, device=META)))

# paged cache: pools (5, 2, 16, 16), block_table (2, 2) int32, seqlens [3, 5]; window; return_lse


def kvp(backend, table=None, pool=None, seqlens=None, **kw):
    table = torch.tensor([[3, 0], [1, 4]], dtype=torch.int32) if table is None else table
    pool = rn(5, 2, 16, 16) if pool is None else pool
    return kvc(backend, kc=pool, vc=pool.clone(), seqlens=seqlens, block_table=table, **kw)


bad("kv_block_table_int64", KV, TypeError, "block_table")(
    lambda b: kvp(b, table=torch.tensor([[3, 0], [1, 4]])))
bad("kv_block_table_1d", KV, ValueError, "block_table")(
    lambda b: kvp(b, table=torch.tensor([3, 0], dtype=torch.int32)))
bad("kv_block_table_wrong_batch", KV, ValueError, "block_table")(
    lambda b: kvp(b, table=torch.tensor([[3, 0]], dtype=torch.int32)))
bad("kv_block_table_on_other_device", KV, RuntimeError, "block_table")(
    lambda b: kvp(b, table=torch.zeros(2, 2, dtype=torch.int32, device=META)))
bad("kv_block_table_entry_past_pool", KV, ValueError, "block_table[1, 0]")(
    lambda b: kvp(b, table=torch.tensor([[3, 0], [5, 4]], dtype=torch.int32)))
bad("kv_block_table_entry_negative", KV, ValueError, "block_table[0, 0]")(
    lambda b: kvp(b, table=torch.tensor([[-1, 0], [1, 4]], dtype=torch.int32)))
bad("kv_block_table_entry_past_pool_by_new_token", KV, ValueError, "block_table[1, 1]")(
    # seqlens [3, 16] + 1 new token: token 16 of sequence 1 lives in its second block (7)
    lambda b: kvp(b, table=torch.tensor([[3, 0], [1, 7]], dtype=torch.int32),
                  seqlens=torch.tensor([3, 16], dtype=torch.int32), k_new=rn(2, 2, 1, 16),
                  v_new=rn(2, 2, 1, 16)))
bad("kv_block_size_not_multiple_of_16", KV, ValueError, "block_size")(
    lambda b: kvp(b, pool=rn(5, 2, 8, 16)))
bad("kv_paged_capacity_too_small", KV, ValueError, "cache_seqlens")(
    lambda b: kvp(b, table=torch.tensor([[3], [1]], dtype=torch.int32),
                  seqlens=torch.tensor([3, 16], dtype=torch.int32), k_new=rn(2, 2, 1, 16),
                  v_new=rn(2, 2, 1, 16)))
bad("kv_paged_head_dim_mismatch", KV, ValueError, "k_cache")(
    lambda b: kvp(b, pool=rn(5, 2, 16, 8)))
bad("kv_window_negative", KV, ValueError, "window")(lambda b: kvc(b, window=(-2, 0)))
bad("kv_window_not_pair", KV, TypeError, "window")(lambda b: kvc(b, window=4))


@edge("kv_paged_unused_entries_not_read", KV)
def _(b):
    # entries past each sequence's tokens may hold anything (a server pads tables with -1):
    # they are neither checked nor read
    table = torch.tensor([[3, -1], [1, 99]], dtype=torch.int32)
    pool, q = rn(5, 2, 16, 16), rn(2, 2, 1, 16)
    out, lse = kvp(b, q=q, table=table, pool=pool, return_lse=True)
    kr = torch.stack([pool[3], pool[1]]).double()  # the one used block of each sequence
    seqlens = torch.tensor([3, 5], dtype=torch.int32)
    want, want_lse = reference.attention_with_kvcache(q.double(), kr, kr.clone(), seqlens,
                                                      return_lse=True)
    lo, lo_lse = reference.attention_with_kvcache(q, kr.float(), kr.float(), seqlens,
                                                  return_lse=True)
    assert_close_rule(out, want, lo)
    assert_close_rule(lse, want_lse, lo_lse)


@edge("kv_paged_empty_sequence_lse", KV)
def _(b):
    # nothing cached, nothing appended: zeros and lse = -inf
    out, lse = kvp(b, seqlens=torch.zeros(2, dtype=torch.int32), return_lse=True)
    assert torch.equal(out, torch.zeros(2, 2, 1, 16))
    assert torch.isneginf(lse).all()

# ---- layer_norm / rms_norm: x (4, 32) -----------------------------------------------------------
LN, RMS = "layer_norm", "rms_norm"


def ln(backend, x=None, shape=(32,), **kw):
    x = rn(4, 32) if x is None else x
    return fastattn.layer_norm(x, shape, backend=backend, **kw)


def rms(backend, x=None, shape=(32,), **kw):
    x = rn(4, 32) if x is None else x
    return fastattn.rms_norm(x, shape, backend=backend, **kw)


bad("ln_input_not_tensor", LN, TypeError, "input")(lambda b: ln(b, x=[[1.0] * 32] * 4))
bad("ln_input_int", LN, TypeError, "input")(lambda b: ln(b, x=torch.ones(4, 32, dtype=torch.int32)))
bad("ln_normalized_shape_mismatch", LN, ValueError, "normalized_shape")(lambda b: ln(b, shape=(16,)))
bad("ln_normalized_shape_negative", LN, ValueError, "normalized_shape")(lambda b: ln(b, shape=-1))
bad("ln_normalized_shape_empty", LN, ValueError, "normalized_shape")(lambda b: ln(b, shape=()))
bad("ln_normalized_shape_too_long", LN, ValueError, "normalized_shape")(
    lambda b: ln(b, shape=(2, 4, 32)))
bad("ln_normalized_shape_float", LN, TypeError, "normalized_shape")(lambda b: ln(b, shape=32.0))
bad("ln_weight_wrong_shape", LN, ValueError, "weight")(lambda b: ln(b, weight=torch.ones(31)))
bad("ln_bias_int", LN, TypeError, "bias")(lambda b: ln(b, bias=torch.zeros(32, dtype=torch.int64)))
bad("ln_weight_on_other_device", LN, RuntimeError, "weight")(
    lambda b: ln(b, weight=torch.ones(32, device=META)))
bad("ln_residual_wrong_shape", LN, ValueError, "residual")(lambda b: ln(b, residual=rn(4, 31)))
bad("ln_residual_wrong_dtype", LN, TypeError, "residual")(
    lambda b: ln(b, residual=rn(4, 32, dtype=torch.bfloat16)))
bad("ln_eps_negative", LN, ValueError, "eps")(lambda b: ln(b, eps=-1e-5))
bad("ln_eps_nan", LN, ValueError, "eps")(lambda b: ln(b, eps=float("nan")))
bad("ln_bad_backend_string", LN, ValueError, "backend", backends=("reference",))(
    lambda b: ln("cuda_fast"))
# FlashAttention's layer_norm_fn keywords
bad("ln_x1_wrong_shape", LN, ValueError, "x1")(lambda b: ln(b, x1=rn(4, 31)))
bad("ln_x1_wrong_dtype", LN, TypeError, "x1")(lambda b: ln(b, x1=rn(4, 32, dtype=torch.float16)))
bad("ln_weight1_wrong_shape", LN, ValueError, "weight1")(lambda b: ln(b, weight1=torch.ones(33)))
bad("ln_bias1_without_weight1", LN, ValueError, "bias1")(lambda b: ln(b, bias1=torch.ones(32)))
bad("ln_rowscale_wrong_shape", LN, ValueError, "rowscale")(
    lambda b: ln(b, rowscale=torch.ones(4, 32)))
bad("ln_residual_cannot_hold", LN, TypeError, "residual")(
    lambda b: ln(b, x=rn(4, 32, dtype=torch.float16), residual=rn(4, 32, dtype=torch.bfloat16)))
bad("ln_dropout_p_one", LN, ValueError, "dropout_p")(lambda b: ln(b, dropout_p=1.0))
bad("rms_offset_without_weight", RMS, ValueError, "offset")(lambda b: rms(b, offset=1.0))
bad("rms_x1_on_other_device", RMS, RuntimeError, "x1")(
    lambda b: rms(b, x1=rn(4, 32, device=META)))
bad("rms_normalized_shape_mismatch", RMS, ValueError, "normalized_shape")(
    lambda b: rms(b, shape=(4,)))
bad("rms_weight_wrong_shape", RMS, ValueError, "weight")(lambda b: rms(b, weight=torch.ones(4, 8)))
bad("rms_residual_on_other_device", RMS, RuntimeError, "residual")(
    lambda b: rms(b, residual=rn(4, 32, device=META)))
bad("rms_eps_inf", RMS, ValueError, "eps")(lambda b: rms(b, eps=float("inf")))
bad("rms_input_bool", RMS, TypeError, "input")(
    lambda b: rms(b, x=torch.ones(4, 32, dtype=torch.bool)))

# ---- int8 ----------------------------------------------------------------------------------------
QT, QC, GEMM, LIN, WOL = ("quantize_per_token", "quantize_per_channel", "int8_gemm", "int8_linear",
                          "int8_weight_only_linear")


def gemm(backend, a=None, bm=None, *args, **kw):
    a = i8(5, 32) if a is None else a
    bm = i8(6, 32) if bm is None else bm
    return fastattn.int8_gemm(a, bm, *args, backend=backend, **kw)


def lin(backend, x=None, w=None, s=None, bias=None, fn=LIN):
    x = rn(5, 32) if x is None else x
    w = i8(6, 32) if w is None else w
    s = torch.full((6,), 0.01) if s is None else s
    return getattr(fastattn, fn)(x, w, s, bias, backend=backend)


bad("qt_input_int8", QT, TypeError, "x")(lambda b: fastattn.quantize_per_token(i8(4, 8), backend=b))
bad("qt_input_0d", QT, ValueError, "x")(lambda b: fastattn.quantize_per_token(rn(), backend=b))
bad("qt_input_not_tensor", QT, TypeError, "x")(
    lambda b: fastattn.quantize_per_token([1.0, 2.0], backend=b))
bad("qc_weight_1d", QC, ValueError, "w")(lambda b: fastattn.quantize_per_channel(rn(8), backend=b))
bad("qc_weight_3d", QC, ValueError, "w")(lambda b: fastattn.quantize_per_channel(rn(2, 3, 8), backend=b))
bad("qc_weight_int32", QC, TypeError, "w")(
    lambda b: fastattn.quantize_per_channel(torch.ones(4, 8, dtype=torch.int32), backend=b))
bad("gemm_a_float", GEMM, TypeError, "a")(lambda b: gemm(b, a=rn(5, 32)))
bad("gemm_b_uint8", GEMM, TypeError, "b")(lambda b: gemm(b, bm=torch.ones(6, 32, dtype=torch.uint8)))
bad("gemm_b_1d", GEMM, ValueError, "b")(lambda b: gemm(b, bm=i8(32)))
bad("gemm_k_mismatch", GEMM, ValueError, "b.shape[1]")(lambda b: gemm(b, bm=i8(6, 31)))
bad("gemm_b_on_other_device", GEMM, RuntimeError, "b")(lambda b: gemm(b, bm=i8(6, 32, device=META)))
bad("gemm_a_scale_wrong_shape", GEMM, ValueError, "a_scale")(
    lambda b: gemm(b, None, None, torch.ones(6), torch.ones(6)))
bad("gemm_a_scale_int", GEMM, TypeError, "a_scale")(
    lambda b: gemm(b, None, None, torch.ones(5, dtype=torch.int32), torch.ones(6)))
bad("gemm_b_scale_nan", GEMM, ValueError, "b_scale")(
    lambda b: gemm(b, None, None, torch.ones(5), torch.tensor([1, 1, float("nan"), 1, 1, 1.0])))
bad("gemm_a_scale_inf", GEMM, ValueError, "a_scale")(
    lambda b: gemm(b, None, None, torch.tensor([1, float("inf"), 1, 1, 1.0]), torch.ones(6)))
bad("gemm_bias_without_scales", GEMM, ValueError, "bias")(
    lambda b: gemm(b, None, None, None, None, torch.ones(6)))
bad("gemm_bias_wrong_shape", GEMM, ValueError, "bias")(
    lambda b: gemm(b, None, None, torch.ones(5), torch.ones(6), torch.ones(5)))
bad("gemm_out_dtype_int8", GEMM, TypeError, "out_dtype")(
    lambda b: gemm(b, None, None, torch.ones(5), torch.ones(6), out_dtype=torch.int8))
bad("gemm_out_dtype_float_without_scales", GEMM, TypeError, "out_dtype")(
    lambda b: gemm(b, out_dtype=torch.float32))
bad("gemm_bad_backend_string", GEMM, ValueError, "backend", backends=("reference",))(
    lambda b: gemm("int8"))
bad("lin_x_int8", LIN, TypeError, "x")(lambda b: lin(b, x=i8(5, 32)))
bad("lin_w_float", LIN, TypeError, "w_int8")(lambda b: lin(b, w=rn(6, 32)))
bad("lin_k_mismatch", LIN, ValueError, "w_int8.shape[1]")(lambda b: lin(b, x=rn(5, 33)))
bad("lin_w_scale_missing", LIN, TypeError, "w_scale")(
    lambda b: fastattn.int8_linear(rn(5, 32), i8(6, 32), None, backend=b))
bad("lin_w_scale_wrong_shape", LIN, ValueError, "w_scale")(lambda b: lin(b, s=torch.ones(5)))
bad("lin_w_scale_nan", LIN, ValueError, "w_scale")(
    lambda b: lin(b, s=torch.tensor([1, 1, 1, float("nan"), 1, 1.0])))
bad("lin_bias_wrong_shape", LIN, ValueError, "bias")(lambda b: lin(b, bias=torch.ones(7)))
bad("lin_w_on_other_device", LIN, RuntimeError, "w_int8")(lambda b: lin(b, w=i8(6, 32, device=META)))
bad("lin_small_m_w_scale_inf", LIN, ValueError, "w_scale")(
    lambda b: lin(b, x=rn(1, 32), s=torch.tensor([1, 1, 1, float("inf"), 1, 1.0])))
bad("wol_x_3d_k_mismatch", WOL, ValueError, "w_int8.shape[1]")(
    lambda b: lin(b, x=rn(2, 3, 16), fn=WOL))
bad("wol_w_scale_int", WOL, TypeError, "w_scale")(
    lambda b: lin(b, s=torch.ones(6, dtype=torch.int64), fn=WOL))

# ---- silu_mul: x (4, 2 * 16) ----------------------------------------------------------------------
SM = "silu_mul"


def sm(backend, x=None):
    return fastattn.silu_mul(rn(4, 32) if x is None else x, backend=backend)


bad("sm_x_not_tensor", SM, TypeError, "x")(lambda b: sm(b, x=[[1.0] * 32] * 4))
bad("sm_x_int", SM, TypeError, "x must be a floating-point")(
    lambda b: sm(b, x=torch.ones(4, 32, dtype=torch.int32)))
bad("sm_x_bool", SM, TypeError, "x must be a floating-point")(
    lambda b: sm(b, x=torch.ones(4, 32, dtype=torch.bool)))
bad("sm_x_0d", SM, ValueError, "x must have at least one dimension")(
    lambda b: sm(b, x=torch.tensor(1.0)))
bad("sm_x_odd_width", SM, ValueError, "x.shape[-1] must be even")(lambda b: sm(b, x=rn(4, 31)))
bad("sm_x_zero_width", SM, ValueError, "x.shape[-1] must be even and > 0")(
    lambda b: sm(b, x=rn(4, 0)))
bad("sm_bad_backend_string", SM, ValueError, "backend", backends=("reference",))(
    lambda b: sm("silu"))
bad("sm_cuda_backend_on_cpu_tensor", SM, RuntimeError, "backend='cuda'", backends=("reference",))(
    lambda b: sm("cuda"))

# ---- modules and convert -------------------------------------------------------------------------
MHA, NLN, NRMS, I8L = "nn.MultiheadAttention", "nn.LayerNorm", "nn.RMSNorm", "nn.Int8Linear"
# torch.nn.MultiheadAttention raises AssertionError for bad shapes; the drop-in raises the same
_MHA_ERRORS = (AssertionError, ValueError, RuntimeError)


def mha(backend, **kw):
    m = fastattn.nn.MultiheadAttention(16, 4, batch_first=True, backend=backend, **kw)
    return m


def _norm_module(cls_name: str, *args, backend: str, **kw):
    return getattr(fastattn.nn, cls_name)(*args, backend=backend, **kw)


bad("mha_embed_dim_not_divisible", MHA, _MHA_ERRORS, "embed_dim")(
    lambda b: fastattn.nn.MultiheadAttention(16, 3, backend=b))
bad("mha_query_wrong_embed_dim", MHA, _MHA_ERRORS, "embed")(
    lambda b: mha(b)(rn(2, 5, 12), rn(2, 5, 12), rn(2, 5, 12)))
bad("mha_query_4d", MHA, _MHA_ERRORS, "query")(
    lambda b: mha(b)(rn(1, 2, 5, 16), rn(1, 2, 5, 16), rn(1, 2, 5, 16)))
bad("mha_attn_mask_wrong_shape", MHA, _MHA_ERRORS, "attn_mask")(
    lambda b: mha(b)(rn(2, 5, 16), rn(2, 7, 16), rn(2, 7, 16),
                     attn_mask=torch.zeros(5, 6, dtype=torch.bool)))
bad("mha_attn_mask_int", MHA, _MHA_ERRORS, "attn_mask")(
    lambda b: mha(b)(rn(2, 5, 16), rn(2, 5, 16), rn(2, 5, 16),
                     attn_mask=torch.zeros(5, 5, dtype=torch.int64)))
bad("mha_key_padding_mask_wrong_shape", MHA, _MHA_ERRORS, "key_padding_mask")(
    lambda b: mha(b)(rn(2, 5, 16), rn(2, 7, 16), rn(2, 7, 16),
                     key_padding_mask=torch.zeros(2, 6, dtype=torch.bool)))
bad("mha_bad_backend_string", MHA, ValueError, "backend", backends=("reference",))(
    lambda b: mha("fastest")(rn(2, 5, 16), rn(2, 5, 16), rn(2, 5, 16), need_weights=False))
# need_weights=True (the default) computes the output without the kernel: the typo must still
# be reported, at construction or at the call
bad("mha_bad_backend_string_need_weights", MHA, ValueError, "backend", backends=("reference",))(
    lambda b: mha("fastest")(rn(2, 5, 16), rn(2, 5, 16), rn(2, 5, 16)))
bad("nn_layer_norm_bad_backend_string", NLN, ValueError, "backend", backends=("reference",))(
    lambda b: _norm_module("LayerNorm", 16, backend="fastest")(rn(2, 16)))
bad("nn_int8_linear_bad_backend_string", I8L, ValueError, "backend", backends=("reference",))(
    lambda b: fastattn.nn.Int8Linear.from_float(nn.Linear(16, 8), backend="fastest")(rn(9, 16)))


bad("nn_layer_norm_input_wrong_width", NLN, (ValueError, RuntimeError), "normalized_shape")(
    lambda b: _norm_module("LayerNorm", 8, backend=b)(rn(2, 7)))
bad("nn_layer_norm_negative_size", NLN, (ValueError, RuntimeError), "negative")(
    lambda b: _norm_module("LayerNorm", -1, backend=b))
bad("nn_rms_norm_input_wrong_width", NRMS, (ValueError, RuntimeError), "normalized_shape")(
    lambda b: _norm_module("RMSNorm", 8, backend=b)(rn(2, 7)))
bad("nn_rms_norm_int_input", NRMS, (TypeError, RuntimeError), "input")(
    lambda b: _norm_module("RMSNorm", 8, backend=b)(torch.ones(2, 8, dtype=torch.int32)))
bad("nn_int8_linear_input_wrong_width", I8L, ValueError, "shape[-1]")(
    lambda b: fastattn.nn.Int8Linear.from_float(nn.Linear(8, 4), backend=b)(rn(3, 7)))
bad("nn_int8_linear_from_conv", I8L, TypeError, "linear")(
    lambda b: fastattn.nn.Int8Linear.from_float(nn.Conv1d(2, 2, 1), backend=b))
bad("nn_int8_linear_negative_size", I8L, (ValueError, RuntimeError), "negative")(
    lambda b: fastattn.nn.Int8Linear(-1, 4, backend=b))
bad("nn_int8_linear_int_input", I8L, TypeError, "x")(
    lambda b: fastattn.nn.Int8Linear.from_float(nn.Linear(8, 4), backend=b)(
        torch.ones(3, 8, dtype=torch.int64)))
bad("nn_int8_linear_input_on_other_device", I8L, RuntimeError, "w_int8")(
    lambda b: fastattn.nn.Int8Linear.from_float(nn.Linear(8, 4), backend=b)(rn(5, 8, device=META)))
bad("convert_not_a_module", "convert", TypeError, "model", backends=("reference",))(
    lambda b: fastattn.convert("not a model"))
bad("convert_filter_fn_not_callable", "convert", TypeError, "filter_fn", backends=("reference",))(
    lambda b: fastattn.convert(nn.Sequential(nn.LayerNorm(4)), filter_fn=3))

# ---- attention_varlen: q (9, 2, 16), k/v (11, 1, 16); sequences (4, 3), (0, 5), (5, 3) ---------
VL = "attention_varlen"


def i32(*values):
    return torch.tensor(values, dtype=torch.int32)


def vl(backend, q=None, k=None, v=None, cu_q=None, cu_k=None, max_q=5, max_k=5, **kw):
    q = rn(9, 2, 16) if q is None else q
    k = rn(11, 1, 16) if k is None else k
    v = rn(11, 1, 16) if v is None else v
    cu_q = i32(0, 4, 4, 9) if cu_q is None else cu_q
    cu_k = i32(0, 3, 8, 11) if cu_k is None else cu_k
    return fastattn.attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, backend=backend, **kw)


bad("vl_q_4d", VL, ValueError, "q must be 3-D")(lambda b: vl(b, q=rn(1, 9, 2, 16)))
bad("vl_q_not_tensor", VL, TypeError, "q")(lambda b: vl(b, q=[[1.0]]))
bad("vl_q_int", VL, TypeError, "q")(lambda b: vl(b, q=torch.ones(9, 2, 16, dtype=torch.int32)))
bad("vl_k_dtype_mismatch", VL, TypeError, "k must have q's dtype")(
    lambda b: vl(b, k=rn(11, 1, 16, dtype=torch.float16)))
bad("vl_v_length_mismatch", VL, ValueError, "v.shape[0]")(lambda b: vl(b, v=rn(10, 1, 16)))
bad("vl_v_heads_mismatch", VL, ValueError, "v.shape[1]")(lambda b: vl(b, v=rn(11, 2, 16)))
bad("vl_head_dim_mismatch", VL, ValueError, "k.shape[2]")(
    lambda b: vl(b, k=rn(11, 1, 8), v=rn(11, 1, 8)))
bad("vl_heads_not_multiple", VL, ValueError, "heads")(
    lambda b: vl(b, q=rn(9, 3, 16), k=rn(11, 2, 16), v=rn(11, 2, 16)))
bad("vl_zero_kv_heads", VL, ValueError, "heads")(
    lambda b: vl(b, k=rn(11, 0, 16), v=rn(11, 0, 16)))
bad("vl_k_on_other_device", VL, RuntimeError, "k")(lambda b: vl(b, k=rn(11, 1, 16, device=META)))
bad("vl_cu_seqlens_int64", VL, TypeError, "cu_seqlens_q")(
    lambda b: vl(b, cu_q=torch.tensor([0, 4, 4, 9])))
bad("vl_cu_seqlens_list", VL, TypeError, "cu_seqlens_k")(lambda b: vl(b, cu_k=[0, 3, 8, 11]))
bad("vl_cu_seqlens_2d", VL, ValueError, "cu_seqlens_q")(
    lambda b: vl(b, cu_q=i32(0, 4, 4, 9)[None]))
bad("vl_cu_seqlens_empty", VL, ValueError, "cu_seqlens_k")(
    lambda b: vl(b, cu_k=torch.zeros(0, dtype=torch.int32)))
bad("vl_cu_seqlens_lengths_differ", VL, ValueError, "cu_seqlens_k")(
    lambda b: vl(b, cu_k=i32(0, 3, 11)))
bad("vl_cu_seqlens_on_other_device", VL, RuntimeError, "cu_seqlens_q")(
    lambda b: vl(b, cu_q=torch.zeros(4, dtype=torch.int32, device=META)))
bad("vl_cu_seqlens_decreasing", VL, ValueError, "cu_seqlens_k must be non-decreasing")(
    lambda b: vl(b, cu_k=i32(0, 8, 3, 11)))
bad("vl_cu_seqlens_negative", VL, ValueError, "cu_seqlens_q must be non-decreasing")(
    lambda b: vl(b, cu_q=i32(0, -2, 4, 9)))
bad("vl_cu_seqlens_not_from_0", VL, ValueError, "cu_seqlens_q must start at 0")(
    lambda b: vl(b, cu_q=i32(1, 4, 4, 9)))
# past the packed rows (a kernel would read outside k/v) or short of them
bad("vl_cu_seqlens_beyond_total", VL, ValueError, "cu_seqlens_k[-1]")(
    lambda b: vl(b, cu_k=i32(0, 3, 8, 12)))
bad("vl_cu_seqlens_short_of_total", VL, ValueError, "cu_seqlens_q[-1]")(
    lambda b: vl(b, cu_q=i32(0, 4, 4, 8)))
bad("vl_max_seqlen_q_too_small", VL, ValueError, "max_seqlen_q")(lambda b: vl(b, max_q=4))
bad("vl_max_seqlen_k_too_small", VL, ValueError, "max_seqlen_k")(lambda b: vl(b, max_k=3))
bad("vl_max_seqlen_negative", VL, ValueError, "max_seqlen_q")(lambda b: vl(b, max_q=-1))
bad("vl_max_seqlen_float", VL, TypeError, "max_seqlen_k")(lambda b: vl(b, max_k=5.0))
bad("vl_dropout_one", VL, ValueError, "dropout_p")(lambda b: vl(b, dropout_p=1.0))
bad("vl_scale_nan", VL, ValueError, "scale")(lambda b: vl(b, scale=float("nan")))
bad("vl_window_below_minus_one", VL, ValueError, "window")(lambda b: vl(b, window=(0, -3)))
bad("vl_bad_causal_alignment", VL, ValueError, "causal_alignment")(
    lambda b: vl(b, is_causal=True, causal_alignment="bottom"))
bad("vl_softcap_zero", VL, ValueError, "softcap")(lambda b: vl(b, softcap=0.0))
bad("vl_alibi_wrong_shape", VL, ValueError, "alibi_slopes")(
    lambda b: vl(b, alibi_slopes=rn(2, 2)))  # B = 3 sequences: (2,) or (3, 2)
bad("vl_alibi_float16", VL, TypeError, "alibi_slopes")(
    lambda b: vl(b, alibi_slopes=rn(2, dtype=torch.float16)))
bad("vl_sinks_wrong_shape", VL, ValueError, "sinks")(lambda b: vl(b, sinks=rn(1)))
bad("vl_sinks_on_other_device", VL, RuntimeError, "sinks")(
    lambda b: vl(b, sinks=rn(2, device=META)))
bad("vl_float64_on_kernel_backend", VL, RuntimeError, "dtype", backends=("cpu", "triton"))(
    lambda b: vl(b, q=rn(9, 2, 16, dtype=torch.float64), k=rn(11, 1, 16, dtype=torch.float64),
                 v=rn(11, 1, 16, dtype=torch.float64)))
bad("vl_bad_backend_string", VL, ValueError, "backend", backends=("reference",))(
    lambda b: vl("varlen"))


# =============================================================================================
# valid edge cases (the behaviour table is in tests/test_bad_input.py)
# =============================================================================================
def check_sdpa(backend, q, k, v, mask=None, *, grad=True, **kw):
    """Run the backend and hold out/lse/grads to the rule against the float64 reference; also
    require no NaN where the reference has none (assert_close_rule compares non-finite
    positions exactly)."""
    leaves = [t.detach().clone().requires_grad_(grad) for t in (q, k, v)]
    out, lse = fastattn.scaled_dot_product_attention(*leaves, mask, return_lse=True,
                                                     backend=backend, **kw)

    def ref(dtype):
        ins = [t.detach().to(dtype).requires_grad_(grad) for t in (q, k, v)]
        m = mask if mask is None or mask.dtype == torch.bool else mask.to(dtype)
        o, lse_r = reference.scaled_dot_product_attention(*ins, m, return_lse=True, **kw)
        return o, lse_r.float(), ins

    o_hi, l_hi, ins_hi = ref(torch.float64)
    o_lo, l_lo, ins_lo = ref(q.dtype)
    assert_close_rule(out, o_hi, o_lo, name="out")
    assert_close_rule(lse, l_hi, l_lo, name="lse")
    if grad and out.numel():
        g = torch.randn(o_hi.shape, dtype=torch.float64)
        for o in (out, o_hi, o_lo):
            (o.double() * g).sum().backward()
        for name, t, hi, lo in zip("qkv", leaves, ins_hi, ins_lo, strict=True):
            assert_close_rule(t.grad, hi.grad, lo.grad, factor=3.0, name=f"d{name}")
    return out, lse


@edge("sdpa_L1_S1", SDPA)
def _(b):
    for dtype in (torch.float32, torch.bfloat16):
        check_sdpa(b, rn(1, 2, 1, 16, dtype=dtype), rn(1, 2, 1, 16, dtype=dtype),
                   rn(1, 2, 1, 16, dtype=dtype), is_causal=True)


@edge("sdpa_L1_S37_bottom_right", SDPA)
def _(b):
    check_sdpa(b, rn(2, 2, 1, 40), rn(2, 2, 37, 40), rn(2, 2, 37, 40), is_causal=True,
               causal_alignment="bottom_right")


@edge("sdpa_zero_batch", SDPA)
def _(b):
    out = check_sdpa(b, rn(0, 2, 5, 16), rn(0, 2, 7, 16), rn(0, 2, 7, 16))[0]
    assert out.shape == (0, 2, 5, 16)


@edge("sdpa_zero_length_query", SDPA)
def _(b):
    out = check_sdpa(b, rn(1, 2, 0, 16), rn(1, 2, 7, 16), rn(1, 2, 7, 16))[0]
    assert out.shape == (1, 2, 0, 16)


@edge("sdpa_zero_length_keys", SDPA)
def _(b):
    # F.scaled_dot_product_attention returns zeros: no key is visible to any query
    q, k = rn(1, 2, 5, 16), rn(1, 2, 0, 16)
    out, lse = fastattn.scaled_dot_product_attention(q, k, k, return_lse=True, backend=b)
    assert torch.equal(out, torch.zeros(1, 2, 5, 16)), out
    assert torch.equal(lse, torch.full((1, 2, 5), float("-inf"))), lse


@edge("sdpa_head_dim_0_default_scale", SDPA)
def _(b):
    # E = 0: every score is 0, so each query averages the values (what F.sdpa returns)
    q, v = rn(1, 2, 5, 0), rn(1, 2, 6, 8)
    out = fastattn.scaled_dot_product_attention(q, rn(1, 2, 6, 0), v, backend=b)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, rn(1, 2, 6, 0), v))


@edge("sdpa_all_masked_rows_bool", SDPA)
def _(b):
    mask = torch.rand(1, 2, 9, 12) > 0.5
    mask[:, :, 3] = False  # rows with no visible key
    mask[:, 1, 7] = False
    out, lse = check_sdpa(b, rn(1, 2, 9, 16, dtype=torch.bfloat16), rn(1, 2, 12, 16, dtype=torch.bfloat16),
                          rn(1, 2, 12, 16, dtype=torch.bfloat16), mask)
    assert (out[:, :, 3] == 0).all() and torch.isneginf(lse[:, :, 3]).all()


@edge("sdpa_float_mask_neg_inf_rows", SDPA)
def _(b):
    mask = rn(1, 1, 9, 12)
    mask[..., 2, :] = float("-inf")  # a whole row
    mask[..., 5, ::2] = float("-inf")  # half a row
    out, lse = check_sdpa(b, rn(2, 2, 9, 16), rn(2, 2, 12, 16), rn(2, 2, 12, 16), mask)
    assert (out[:, :, 2] == 0).all() and torch.isneginf(lse[:, :, 2]).all()


@edge("sdpa_window_empties_rows", SDPA)
def _(b):
    # bottom-right causal with L > S: the first L - S query rows see no key
    out, lse = check_sdpa(b, rn(1, 2, 12, 16), rn(1, 2, 5, 16), rn(1, 2, 5, 16), is_causal=True,
                          causal_alignment="bottom_right", window=(2, 0))
    assert (out[:, :, :7] == 0).all()


@edge("sdpa_logits_1e4", SDPA)
def _(b):
    for dtype in (torch.float32, torch.bfloat16):
        # |q.k| * scale ~ 1e4: softmax is one-hot in practice, exp must not overflow
        q, k = rn(1, 2, 9, 16, dtype=dtype) * 100, rn(1, 2, 12, 16, dtype=dtype) * 100
        out, _ = check_sdpa(b, q, k, rn(1, 2, 12, 16, dtype=dtype), grad=False)
        assert torch.isfinite(out).all()


@edge("sdpa_tiny_inputs_1e-30", SDPA)
def _(b):
    q, k, v = rn(1, 2, 9, 16) * 1e-30, rn(1, 2, 12, 16) * 1e-30, rn(1, 2, 12, 16) * 1e-30
    out, _ = check_sdpa(b, q, k, v)
    assert torch.isfinite(out).all() and out.abs().max() > 0


@edge("kv_empty_cache_no_new_tokens", KV)
def _(b):
    # nothing cached and nothing appended: every query sees no key -> zeros
    out = kvc(b, q=rn(2, 2, 1, 16), seqlens=torch.zeros(2, dtype=torch.int32))
    assert torch.equal(out, torch.zeros(2, 2, 1, 16)), out


@edge("kv_full_cache", KV)
def _(b):
    kc, vc, q = rn(2, 2, 8, 16), rn(2, 2, 8, 16), rn(2, 2, 3, 16)
    kn, vn = rn(2, 2, 3, 16), rn(2, 2, 3, 16)
    seqlens = torch.tensor([0, 5], dtype=torch.int32)  # batch 1 ends exactly at capacity
    kr, vr = kc.double(), vc.double()
    want = reference.attention_with_kvcache(q.double(), kr, vr, seqlens, kn.double(), vn.double())
    lo = reference.attention_with_kvcache(q, kc.clone(), vc.clone(), seqlens, kn, vn)
    out = kvc(b, q=q, kc=kc, vc=vc, seqlens=seqlens, k_new=kn, v_new=vn)
    assert_close_rule(out, want, lo)
    assert torch.equal(kc.double(), kr) and torch.equal(vc.double(), vr), "cache update differs"


@edge("kv_rotary_table_exactly_long_enough", KV)
def _(b):
    # seqlens [3, 5] + 1 new token: the last position (5) is the table's last row
    q, kc, vc, kn, vn = rn(2, 2, 1, 16), rn(2, 2, 8, 16), rn(2, 2, 8, 16), rn(2, 2, 1, 16), rn(
        2, 2, 1, 16)
    cos, sin = rn(6, 8), rn(6, 8)
    seqlens = torch.tensor([3, 5], dtype=torch.int32)
    kr, vr = kc.double(), vc.double()
    want = reference.attention_with_kvcache(q.double(), kr, vr, seqlens, kn.double(), vn.double(),
                                            rotary_cos=cos.double(), rotary_sin=sin.double())
    klo, vlo = kc.clone(), vc.clone()
    lo = reference.attention_with_kvcache(q, klo, vlo, seqlens, kn, vn, rotary_cos=cos,
                                          rotary_sin=sin)
    out = kvc(b, q=q, kc=kc, vc=vc, seqlens=seqlens, k_new=kn, v_new=vn, rotary_cos=cos,
              rotary_sin=sin)
    assert_close_rule(out, want, lo)
    torch.testing.assert_close(kc, klo, atol=1e-6, rtol=1e-6)
    assert torch.equal(vc, vlo)


@edge("kv_zero_batch", KV)
def _(b):
    out = fastattn.attention_with_kvcache(rn(0, 2, 1, 16), rn(0, 2, 8, 16), rn(0, 2, 8, 16),
                                          torch.zeros(0, dtype=torch.int32), backend=b)
    assert out.shape == (0, 2, 1, 16)


def check_norm(backend, fn, x, weight=None, bias=None, eps=1e-5, grad=True):
    rmsn = fn == "rms_norm"
    args = (weight,) if rmsn else (weight, bias)
    leaves = [t.detach().clone().requires_grad_(grad) for t in (x, *args) if t is not None]
    out = getattr(fastattn, fn)(leaves[0], x.shape[-1], *_fill(leaves[1:], args), eps=eps,
                                backend=backend)

    def ref(dtype):
        ins = [t.detach().to(dtype).requires_grad_(grad) for t in (x, *args) if t is not None]
        return getattr(reference, fn)(ins[0], x.shape[-1], *_fill(ins[1:], args), eps=eps), ins

    (o_hi, hi), (o_lo, lo) = ref(torch.float64), ref(x.dtype)
    assert_close_rule(out, o_hi, o_lo)
    if grad and out.numel():
        g = torch.randn(out.shape, dtype=torch.float64)
        for o in (out, o_hi, o_lo):
            (o.double() * g).sum().backward()
        for i, (t, h, lw) in enumerate(zip(leaves, hi, lo, strict=True)):
            assert_close_rule(t.grad, h.grad, lw.grad, factor=3.0, name=f"grad[{i}]")
    return out


def _fill(present, args):
    """Put the given tensors back in the positions of the non-None optional args."""
    it = iter(present)
    return [None if a is None else next(it) for a in args]


@edge("ln_zero_rows", LN)
def _(b):
    assert check_norm(b, LN, rn(0, 32), torch.ones(32), torch.zeros(32)).shape == (0, 32)


@edge("ln_width_1", LN)
def _(b):
    # one element per row: variance 0, the output is the bias and d out / d x is 0. The gradient
    # is checked with an absolute bound: its exact value is 0, and float32 rounding of g * w
    # scaled by rstd = 1/sqrt(eps) ~ 316 leaves ~1e-5 (the rule's eps would demand 1e-5).
    x, w, bias = rn(5, 1).requires_grad_(True), rn(1), rn(1)
    out = fastattn.layer_norm(x, 1, w, bias, backend=b)
    torch.testing.assert_close(out, bias.expand(5, 1))
    (out * rn(5, 1)).sum().backward()
    assert x.grad.abs().max() < 1e-3, x.grad


@edge("ln_half_weight_on_float_input", LN)
def _(b):
    # F.layer_norm raises "mixed dtype" here; fastattn accepts it and computes in float32
    x, w, bias = rn(4, 32), rn(32).half(), rn(32).half()
    out = ln(b, x=x, weight=w, bias=bias)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, F.layer_norm(x, (32,), w.float(), bias.float()))


@edge("ln_constant_rows", LN)
def _(b):
    x = torch.full((4, 64), 3.0).bfloat16()
    out = check_norm(b, LN, x, rn(64).bfloat16(), rn(64).bfloat16())
    assert torch.isfinite(out).all()


@edge("ln_inputs_1e4", LN)
def _(b):
    check_norm(b, LN, (rn(4, 300) * 1e4).bfloat16(), rn(300).bfloat16(), rn(300).bfloat16())


@edge("ln_tiny_inputs_1e-30", LN)
def _(b):
    out = check_norm(b, LN, rn(4, 300) * 1e-30, rn(300), rn(300))
    assert torch.isfinite(out).all()


@edge("rms_zero_rows_values", RMS)
def _(b):
    x = rn(4, 64)
    x[1] = 0.0  # an all-zero row: rstd = 1/sqrt(eps), output 0
    out = check_norm(b, RMS, x, rn(64), eps=1e-6)
    assert (out[1] == 0).all()


@edge("rms_tiny_inputs_1e-30", RMS)
def _(b):
    out = check_norm(b, RMS, rn(3, 100) * 1e-30, rn(100))  # eps = 1e-5
    assert torch.isfinite(out).all()


@edge("rms_eps_0_scale_invariant", RMS)
def _(b):
    # eps = 0: the output is scale invariant while mean(x^2) stays a normal float32 (1e-36).
    # Forward only: float32 PyTorch's own gradient overflows here (it involves rstd^3 ~ 1e54).
    out = check_norm(b, RMS, rn(3, 100) * 1e-18, rn(100), eps=0.0, grad=False)
    assert torch.isfinite(out).all()


def check_quant(backend, fn, x):
    q, s = getattr(fastattn, fn)(x, backend=backend)
    q_ref, s_ref = reference.quantize_per_token(x)
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert torch.equal(q, q_ref), f"{(q != q_ref).sum().item()} int8 values differ"
    torch.testing.assert_close(s, s_ref, rtol=0, atol=0, equal_nan=True)


@edge("qt_zero_rows", QT)
def _(b):
    check_quant(b, QT, rn(0, 16))


@edge("qt_k1_and_zero_row", QT)
def _(b):
    check_quant(b, QT, torch.tensor([[0.0], [3.0], [-1e-30]]))


@edge("qt_huge_and_tiny", QT)
def _(b):
    x = rn(4, 40)
    x[0] *= 1e38
    x[1] *= 1e-30
    check_quant(b, QT, x)


@edge("qc_single_channel", QC)
def _(b):
    check_quant(b, QC, rn(1, 17))


@edge("gemm_zero_rows", GEMM)
def _(b):
    out = gemm(b, a=i8(0, 32))
    assert out.shape == (0, 6) and out.dtype == torch.int32


@edge("gemm_k0", GEMM)
def _(b):
    # an empty inner dimension: the product is zeros (torch.matmul's answer), + bias when scaled
    a, bm = i8(3, 0), i8(4, 0)
    assert torch.equal(gemm(b, a, bm), torch.zeros(3, 4, dtype=torch.int32))
    bias = rn(4)
    out = gemm(b, a, bm, torch.ones(3), torch.ones(4), bias)
    assert torch.equal(out, bias.expand(3, 4))


@edge("gemm_k1_extremes", GEMM)
def _(b):
    a = torch.tensor([[-128], [127], [0]], dtype=torch.int8)
    bm = torch.tensor([[-128], [127]], dtype=torch.int8)
    want = torch.tensor([[16384, -16256], [-16256, 16129], [0, 0]], dtype=torch.int32)
    assert torch.equal(gemm(b, a, bm), want)


@edge("lin_zero_rows", LIN)
def _(b):
    out = lin(b, x=rn(0, 32))
    assert out.shape == (0, 6)


# ---- linear: x (4, 32), weight (6, 32) -----------------------------------------------------------
FL = "linear"


def fl(backend, x=None, w=None, bias=None):
    return fastattn.linear(rn(4, 32) if x is None else x, rn(6, 32) if w is None else w, bias,
                           backend=backend)


bad("fl_x_not_tensor", FL, TypeError, "x")(lambda b: fl(b, x=[[1.0] * 32] * 4))
bad("fl_x_int", FL, TypeError, "x must be")(lambda b: fl(b, x=torch.ones(4, 32, dtype=torch.int32)))
bad("fl_x_0d", FL, ValueError, "x must have at least one dimension")(
    lambda b: fl(b, x=torch.tensor(1.0)))
bad("fl_weight_dtype", FL, TypeError, "weight must have x's dtype")(
    lambda b: fl(b, w=rn(6, 32).double()))
bad("fl_weight_1d", FL, ValueError, "weight must be 2-D")(lambda b: fl(b, w=rn(32)))
bad("fl_k_mismatch", FL, ValueError, "weight.shape[1]")(lambda b: fl(b, w=rn(6, 31)))
bad("fl_bias_size", FL, ValueError, "bias")(lambda b: fl(b, bias=rn(5)))
bad("fl_bias_dtype", FL, TypeError, "bias must have x's dtype")(
    lambda b: fl(b, bias=rn(6).half()))
bad("fl_weight_on_other_device", FL, RuntimeError, "weight")(
    lambda b: fl(b, w=torch.empty(6, 32, device=META)))
bad("fl_bad_backend_string", FL, ValueError, "backend", backends=("reference",))(
    lambda b: fl("gemv"))


@edge("fl_odd_shapes_and_zero_rows", FL)
def _(b):
    for M, K, N in ((0, 32, 6), (1, 1, 1), (3, 17, 5), (2, 33, 65)):
        x, w, bias = rn(M, K), rn(N, K), rn(N)
        out = fl(b, x=x, w=w, bias=bias)
        assert out.shape == (M, N)
        assert_close_rule(out, F.linear(x.double(), w.double(), bias.double()), F.linear(x, w, bias))


@edge("lin_zero_row_values", LIN)
def _(b):
    x = rn(9, 32)
    x[4] = 0  # a zero token: scale 0, output = bias
    bias = rn(6)
    out = lin(b, x=x, bias=bias)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[4], bias)


def check_silu_mul(backend, x, grad=True):
    xl = x.detach().clone().requires_grad_(grad)
    out = fastattn.silu_mul(xl, backend=backend)
    hi = x.detach().double().requires_grad_(grad)
    lo = x.detach().clone().requires_grad_(grad)
    o_hi, o_lo = reference.silu_mul(hi), reference.silu_mul(lo)
    assert out.shape == (*x.shape[:-1], x.shape[-1] // 2) and out.dtype == x.dtype
    assert_close_rule(out, o_hi, o_lo)
    if grad and out.numel():
        g = torch.randn(out.shape, dtype=torch.float64)
        for o in (out, o_hi, o_lo):
            (o.double() * g).sum().backward()
        assert_close_rule(xl.grad, hi.grad, lo.grad, factor=3.0, name="dx")
    return out


@edge("sm_zero_rows", SM)
def _(b):
    assert check_silu_mul(b, rn(0, 32)).shape == (0, 16)
    assert check_silu_mul(b, rn(2, 0, 3, 8)).shape == (2, 0, 3, 4)


@edge("sm_width_2", SM)
def _(b):
    # I = 1: a row shorter than any vector
    check_silu_mul(b, rn(5, 2))


@edge("sm_saturated_gates", SM)
def _(b):
    # exp(-g) overflows (g << 0: silu = -0) or underflows (g >> 0: silu = g): finite, as PyTorch
    for dtype in (torch.float32, torch.bfloat16):
        gate = torch.tensor([-1e4, -100.0, -88.8, 88.8, 100.0, 1e4])
        x = torch.cat([gate, rn(6)]).to(dtype).expand(3, 12)
        out = check_silu_mul(b, x)
        assert torch.isfinite(out.float()).all()


@edge("sm_tiny_inputs_1e-30", SM)
def _(b):
    out = check_silu_mul(b, rn(3, 40) * 1e-30)
    assert torch.isfinite(out).all()


def check_varlen(backend, lens_q, lens_k, *, H=2, Hkv=1, E=16, **kw):
    """attention_varlen on one packed batch against the float64 reference (the per-sequence
    loop), out, lse and the gradients of q, k, v by the rule."""
    cu_q = torch.tensor([0] + torch.tensor(lens_q).cumsum(0).tolist(), dtype=torch.int32)
    cu_k = torch.tensor([0] + torch.tensor(lens_k).cumsum(0).tolist(), dtype=torch.int32)
    q, k, v = rn(sum(lens_q), H, E), rn(sum(lens_k), Hkv, E), rn(sum(lens_k), Hkv, E)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = fastattn.attention_varlen(*leaves, cu_q, cu_k, max(lens_q, default=0),
                                         max(lens_k, default=0), return_lse=True,
                                         backend=backend, **kw)

    def ref(dtype):
        ins = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        o, l_ = reference.attention_varlen(*ins, cu_q, cu_k, return_lse=True, **kw)
        return o, l_.float(), ins

    (o_hi, l_hi, hi), (o_lo, l_lo, lo) = ref(torch.float64), ref(torch.float32)
    assert_close_rule(out, o_hi, o_lo, name="out")
    assert_close_rule(lse, l_hi, l_lo, name="lse")
    if out.numel() and o_hi.requires_grad:
        g = torch.randn(o_hi.shape, dtype=torch.float64)
        for o in (out, o_hi, o_lo):
            (o.double() * g).sum().backward()
        for name, t, h, lw in zip("qkv", leaves, hi, lo, strict=True):
            assert_close_rule(t.grad, h.grad, lw.grad, factor=3.0, name=f"d{name}")
    elif out.requires_grad:  # no key anywhere: the output depends on no input value
        for t in torch.autograd.grad(out.sum(), leaves, allow_unused=True):
            assert t is None or not t.any()
    return out, lse


@edge("vl_zero_sequences", VL)
def _(b):
    out = vl(b, q=rn(0, 2, 16), k=rn(0, 1, 16), v=rn(0, 1, 16), cu_q=i32(0), cu_k=i32(0),
             max_q=0, max_k=0)
    assert out.shape == (0, 2, 16)


@edge("vl_empty_and_single_token_sequences", VL)
def _(b):
    # every combination of 0 and 1 query rows / keys, causal both ways
    for align in ("top_left", "bottom_right"):
        out, lse = check_varlen(b, [0, 1, 0, 1, 2], [0, 0, 1, 1, 1], is_causal=True,
                                causal_alignment=align)
        assert torch.equal(out[0], torch.zeros_like(out[0]))  # row of a sequence with no keys
        assert lse[:, 0].eq(float("-inf")).all()


@edge("vl_no_keys_in_any_sequence", VL)
def _(b):
    out, lse = check_varlen(b, [3, 2], [0, 0])
    assert torch.equal(out, torch.zeros_like(out)) and lse.eq(float("-inf")).all()


@edge("vl_window_hides_every_key", VL)
def _(b):
    # bottom-right window (0, 0) with S < L: the first L - S rows see nothing (out 0, lse -inf)
    out, lse = check_varlen(b, [6, 1], [2, 4], window=(0, 0), causal_alignment="bottom_right")
    assert torch.equal(out[:4], torch.zeros_like(out[:4]))


# =============================================================================================
def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backends", default=",".join(BACKENDS))
    ap.add_argument("--after", default=None, help="resume after this <backend>/<entry id>")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    runs = [(b, e) for b in args.backends.split(",") for e in ENTRIES]
    if args.after is not None:
        runs = runs[[f"{b}/{e.id}" for b, e in runs].index(args.after) + 1:]
    for backend, e in runs:
        key = f"{backend}/{e.id}"
        status, detail = "pass", ""
        if backend not in e.backends:
            status, detail = "skip", f"not applicable to backend {backend!r}"
        elif (why := target_unavailable(e.target) or op_unavailable(e.uses, backend)):
            status, detail = "skip", why
        if status == "pass":
            print(f"START {key}", flush=True)
            try:
                e.fn(backend)
            except Exception as exc:  # noqa: BLE001 - every exception is a result here
                msg = f"{type(exc).__name__}: {exc}"
                if e.raises is None:
                    status = "fail"
                    detail = f"valid call failed: {msg}\n{traceback.format_exc(limit=-3)}"
                elif not isinstance(exc, e.raises):
                    status = "fail"
                    detail = (f"raised {msg}; expected {'/'.join(t.__name__ for t in e.raises)} "
                              f"naming {e.match!r}")
                elif e.match not in str(exc):
                    status = "fail"
                    detail = f"the message does not contain {e.match!r}: {msg}"
            else:
                if e.raises is not None:
                    status, detail = "fail", "did not raise"
        print("RESULT " + json.dumps({"id": key, "status": status, "detail": detail[:2000]}),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
