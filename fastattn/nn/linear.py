"""Linear and Int8Linear: ``nn.Linear`` replacements.

``Linear`` is an ``nn.Linear`` (same parameters, same state_dict) whose forward on CPU tensors
runs :func:`fastattn.linear`: the weight streamed at the memory's speed for few rows of x
(decoding), ``at::linear`` above that; other devices run ``F.linear``.

``Int8Linear`` holds per-channel int8 weights (inference).

The weight is quantized once (``Int8Linear.from_float``). Two activation modes:

- ``activations="int8"`` (W8A8, the default of the module): every forward quantizes the
  activations per token and runs the int8 GEMM with the dequantization and bias fused into its
  epilogue (:func:`fastattn.int8_linear`; decode-sized inputs take the weight-only path).
- ``activations="float"`` (weight-only): the activations stay in their float dtype and the int8
  weight is dequantized on the fly inside the kernel (:func:`fastattn.int8_weight_only_linear`).
  Slower for large inputs, but immune to activation outliers: on the all-MiniLM-L6-v2 encoder the
  sentence embeddings keep cosine 0.998 to fp32 where per-token W8A8 gives 0.989.
- ``activations="auto"`` (what ``fastattn.convert(model, int8=True)`` uses): chosen per call from
  the number of rows M. Up to ``AUTO_WEIGHT_ONLY_MAX_M`` rows (decoding: reading the weight is the
  cost) the weight-only kernel. Above it, on CUDA, W8A8 on the int8 GEMM with LLM.int8()'s outlier
  decomposition (``outlier_threshold``: activation columns above it stay in float); on the CPU
  weight-only too, with float32 x rounded to bfloat16 for the products where the CPU multiplies
  bfloat16 natively (``bf16_products`` of :func:`fastattn.int8_weight_only_linear`: the bfloat16
  GEMM's speed, float32 accumulation and output). On the CPU, W8A8 loses too much on post-LN
  encoders: all-MiniLM-L6-v2's smallest sentence cosine to fp32 (32 x 113 tokens) is 0.9963 with
  W8A8 per token, 0.9972-0.9984 with SmoothQuant scales calibrated on other text (alpha 0.5-0.8),
  0.9982-0.9991 with the outlier split at thresholds 6 to 1.5, against 0.99916 for the int8
  weights alone (0.99917 with bf16 products). The outlier split's extra passes over x and the
  output (``fastattn.int8_linear(..., outlier_threshold=)``, composed of separate ops) also made
  the model 0.64x of the float model on 2 Sapphire Rapids-class cores, and SmolLM2-135M's
  perplexity +1.4% against -0.25% weight-only. Under torch.compile "auto" runs weight-only at
  every M.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastattn.ops.int8 import (
    int8_gemm,
    int8_linear,
    int8_weight_only_linear,
    quantize_per_channel,
)
from fastattn.ops.linear import linear


class Linear(nn.Linear):
    """``nn.Linear`` whose forward runs :func:`fastattn.linear` on CPU tensors (``F.linear``
    elsewhere). ``Linear.from_module(linear)`` or a class swap (``m.__class__ = Linear``, what
    ``fastattn.convert`` does) keeps the module's parameters, ties and state_dict."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.device.type == "cpu":
            return linear(input, self.weight, self.bias)
        return F.linear(input, self.weight, self.bias)

    @classmethod
    def from_module(cls, module: nn.Linear) -> Linear:
        """The same module object with this forward (its class swapped; nothing copied)."""
        if type(module) is not nn.Linear:
            raise TypeError(f"module must be a torch.nn.Linear, got {type(module).__name__}")
        module.__class__ = cls
        return module


ACTIVATION_MODES = ("int8", "float", "auto")
# "auto": rows up to which the weight-only kernel runs (decoding, speculative steps, small batches)
AUTO_WEIGHT_ONLY_MAX_M = 16
# "auto": LLM.int8()'s default threshold (bitsandbytes' Linear8bitLt threshold=6.0)
OUTLIER_THRESHOLD = 6.0
# "auto": devices whose larger inputs take W8A8 with the outlier split (see the module docstring)
AUTO_W8A8_DEVICES = ("cuda",)


def _check_activations(activations) -> str:
    if activations not in ACTIVATION_MODES:
        raise ValueError(f"activations must be one of {ACTIVATION_MODES}, got {activations!r}")
    return activations


class Int8Linear(nn.Module):
    """y = x @ (weight * weight_scale[:, None]).T + bias, with x quantized per token to int8
    (``activations="int8"``) or kept in its float dtype (``activations="float"``).

    Buffers: ``weight`` int8 (out_features, in_features), ``weight_scale`` float32
    (out_features,); ``bias`` is a frozen parameter in the float dtype (or None). The state_dict
    holds exactly these, and loading an ``nn.Linear`` state_dict (float ``weight``, no
    ``weight_scale``) quantizes the weight on the way in. ``weight_scale`` stays float32 when the
    module is cast with ``.half()``/``.to(dtype)``; only its device follows.

    Shapes: input (*, in_features) float16/bfloat16/float32 -> output (*, out_features), same dtype.
    """

    __constants__ = ["in_features", "out_features"]

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        backend: str = "auto",
        activations: str = "int8",
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.backend = backend
        self.activations = _check_activations(activations)
        self.register_buffer(
            "weight", torch.zeros((out_features, in_features), dtype=torch.int8, device=device))
        self.register_buffer(
            "weight_scale", torch.ones((out_features,), dtype=torch.float32, device=device))
        if bias:
            self.bias = nn.Parameter(
                torch.zeros(out_features, device=device, dtype=dtype or torch.get_default_dtype()),
                requires_grad=False)
        else:
            self.register_parameter("bias", None)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        mode = self.activations
        if mode == "auto":
            mode = ("float" if (input.numel() <= AUTO_WEIGHT_ONLY_MAX_M * self.in_features
                                or torch.compiler.is_compiling()
                                or input.device.type not in AUTO_W8A8_DEVICES)
                    else "outliers")
            if mode == "float":
                # the CPU's float32 GEMM above 16 rows: products of bfloat16-rounded x where the
                # CPU has them natively (bf16_products; decode-sized calls are unchanged)
                return int8_weight_only_linear(input, self.weight, self.weight_scale, self.bias,
                                               backend=self.backend, bf16_products=True)
        if mode == "float":
            return int8_weight_only_linear(input, self.weight, self.weight_scale, self.bias,
                                           backend=self.backend)
        threshold = OUTLIER_THRESHOLD if mode == "outliers" else None
        return int8_linear(input, self.weight, self.weight_scale, self.bias, backend=self.backend,
                           outlier_threshold=threshold)

    def forward_int8(self, x_int8: torch.Tensor, x_scale: torch.Tensor,
                     out_dtype: torch.dtype) -> torch.Tensor:
        """The W8A8 GEMM of an input already quantized per token, e.g. by the norm before it
        (``fastattn.rms_norm(..., quantize="int8")``): x_int8 (*, in_features) int8, x_scale (*,)
        float32 -> (*, out_features) in out_dtype; the dequantization and bias in the GEMM's
        epilogue."""
        out = int8_gemm(x_int8.reshape(-1, self.in_features), self.weight,
                        x_scale.reshape(-1), self.weight_scale, self.bias, out_dtype,
                        backend=self.backend)
        return out.reshape(*x_int8.shape[:-1], self.out_features)

    @classmethod
    def from_float(cls, linear: nn.Linear, *, backend: str = "auto",
                   activations: str = "int8") -> Int8Linear:
        """Quantizes ``linear.weight`` per output channel (symmetric, absmax / 127) once; the bias
        is copied in its dtype. The new module is on linear's device, in its train/eval mode."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        weight = linear.weight.detach()
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                  device=weight.device, dtype=weight.dtype, backend=backend,
                  activations=activations)
        if weight.is_meta:  # a model built without weights, loaded afterwards
            return new.train(linear.training)
        with torch.no_grad():
            w_int8, scale = quantize_per_channel(weight)
            new.weight.copy_(w_int8)
            new.weight_scale.copy_(scale)
            if linear.bias is not None:
                new.bias.copy_(linear.bias.detach())
        new.train(linear.training)
        return new

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # an nn.Linear checkpoint: quantize its float weight (the per-channel scale is derived)
        w = state_dict.get(prefix + "weight")
        if (isinstance(w, torch.Tensor) and w.is_floating_point()
                and prefix + "weight_scale" not in state_dict and w.shape == self.weight.shape):
            w_int8, scale = quantize_per_channel(w.to(self.weight.device))
            state_dict[prefix + "weight"] = w_int8
            state_dict[prefix + "weight_scale"] = scale
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _apply(self, fn, recurse=True):
        # .half()/.to(dtype) would cast the float32 scale like any float buffer and lose the
        # precision of the dequantization: keep its float32 values, follow only the device.
        scale = self.weight_scale
        super()._apply(fn, recurse)
        if self.weight_scale.dtype != torch.float32:
            self.weight_scale = scale.to(self.weight_scale.device)
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, weight=int8 per-channel, activations="
                + ("int8 per-token" if self.activations == "int8" else "float (weight-only)"))
