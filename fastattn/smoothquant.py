"""SmoothQuant (Xiao et al., 2023) calibration for W8A8 int8 linears.

Transformer activations have a few input channels with values 10-100x larger than the rest; a
per-token int8 scale is then set by those outliers and the other channels lose most of their
bits. Smoothing moves that range into the weights: with s_j = max|X_j|^alpha / max|W_j|^(1-alpha)
per input channel j, X' = X / s and W' = W * s give X' @ W'.T == X @ W.T exactly, and both X' and
W' are easier to quantize. The division by s is folded into the LayerNorm that produces X, so the
smoothed float model computes the same function at no run-time cost.

Usage::

    scales = collect_act_scales(model, calibration_batches)
    for block in model.blocks:
        smooth_layer_norm_linear(block.ln_1, [block.attn.q, block.attn.k, block.attn.v],
                                 scales["blocks.0.attn.q"], alpha=0.5)
    # then swap the nn.Linear layers for fastattn.nn.Int8Linear.from_float(...)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn


def collect_act_scales(
    model: nn.Module,
    batches: Iterable,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
) -> dict[str, torch.Tensor]:
    """Per-input-channel max |x| of the inputs of every ``nn.Linear`` in ``model``.

    Args:
        model: run as given (call ``model.eval()`` first to disable dropout).
        batches: an iterable of model inputs: a tensor (``model(batch)``), a tuple/list
            (``model(*batch)``) or a dict (``model(**batch)``).
        filter_fn: ``filter_fn(module, fully_qualified_name) -> bool`` selects the linears.

    Returns:
        {fully qualified name of the linear: float32 (in_features,) tensor on the CPU}.
    """
    scales: dict[str, torch.Tensor] = {}

    def make_hook(name: str):
        def hook(module, args):
            x = args[0].detach()
            cur = x.reshape(-1, x.shape[-1]).abs().amax(dim=0).float()  # (in_features,)
            prev = scales.get(name)
            scales[name] = cur if prev is None else torch.maximum(prev, cur)

        return hook

    handles = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and (filter_fn is None or filter_fn(module, name)):
            handles.append(module.register_forward_pre_hook(make_hook(name)))
    try:
        with torch.no_grad():
            for batch in batches:
                if isinstance(batch, dict):
                    model(**batch)
                elif isinstance(batch, (tuple, list)):
                    model(*batch)
                else:
                    model(batch)
    finally:
        for h in handles:
            h.remove()
    return {name: s.cpu() for name, s in scales.items()}


@torch.no_grad()
def smooth_layer_norm_linear(
    ln: nn.Module,
    linears: nn.Linear | Sequence[nn.Linear],
    act_scales: torch.Tensor,
    alpha: float = 0.5,
) -> torch.Tensor:
    """Folds the SmoothQuant scales into a LayerNorm/RMSNorm and the linears that read its output.

    Args:
        ln: a module with an affine ``weight`` (K,) and optional ``bias`` (K,) applied last
            (``nn.LayerNorm``, ``nn.RMSNorm``, fastattn's): its output is divided by s.
        linears: the ``nn.Linear`` layers fed by ``ln``'s output (e.g. q, k, v); their weight
            columns are multiplied by s.
        act_scales: (K,) max |input| per channel of those linears (``collect_act_scales``).
        alpha: migration strength in [0, 1]; 0.5 balances activations and weights.

    s_j = max|X_j|^alpha / max_i |W_ij|^(1 - alpha) (maximum over all the linears), both factors
    clamped to >= 1e-5 as in the SmoothQuant reference code, so zero channels stay finite.

    Returns:
        s (K,) float32.
    """
    if isinstance(linears, nn.Linear):
        linears = [linears]
    linears = list(linears)
    if not linears or not all(isinstance(lin, nn.Linear) for lin in linears):
        raise TypeError("linears must be an nn.Linear or a non-empty sequence of nn.Linear")
    weight = getattr(ln, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        raise ValueError("ln must have a 1-D affine weight (elementwise_affine=True) to fold the "
                         "smoothing scales into")
    K = weight.shape[0]
    for lin in linears:
        if lin.in_features != K:
            raise ValueError(f"every linear must have in_features == {K} (ln's size), got "
                             f"{lin.in_features}")
    if not isinstance(act_scales, torch.Tensor) or act_scales.shape != (K,):
        raise ValueError(f"act_scales must be a ({K},) tensor, got "
                         f"{tuple(act_scales.shape) if isinstance(act_scales, torch.Tensor) else act_scales!r}")
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    device = weight.device
    w_max = torch.stack([lin.weight.abs().amax(dim=0).to(device, torch.float32)
                         for lin in linears]).amax(dim=0)  # (K,)
    a_max = act_scales.to(device, torch.float32)
    s = a_max.clamp(min=1e-5).pow(alpha) / w_max.clamp(min=1e-5).pow(1.0 - alpha)  # (K,)
    ln.weight.div_(s.to(ln.weight.dtype))
    bias = getattr(ln, "bias", None)
    if isinstance(bias, torch.Tensor):
        bias.div_(s.to(bias.dtype))
    for lin in linears:
        lin.weight.mul_(s.to(lin.weight.device, lin.weight.dtype)[None, :])
    return s
