"""Saving and loading converted models without their float checkpoint.

A converted model saves with ``torch.save(model.state_dict(), path)``, with
:func:`save_converted` (``.safetensors`` or torch.save; safetensors' own ``save_file`` and
``save_model`` refuse the fused decoder layers, whose q/k/v and gate/up weights are views into one
tensor), or with ``model.save_pretrained(folder)`` for a ``transformers`` model (``convert``
writes its arguments into the model's config, so config.json says how to convert again). Int8
linears save their int8 ``weight`` and float32 ``weight_scale``.

:func:`load_converted` builds the model again with its parameters on the meta device (no float
weights are allocated, read or quantized), converts it the same way, and assigns the saved tensors
in place of the empty ones; the decoder layers fuse again from the loaded tensors. The outputs are
those of the saved model, bit for bit.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Mapping

import torch
from torch import nn

__all__ = ["empty_weights", "load_converted", "save_converted"]

_CONVERT_ARGS = ("attention", "layer_norm", "int8")


@contextlib.contextmanager
def empty_weights():
    """Modules built inside get their parameters on the meta device (no memory, no
    initialisation); buffers, which a state_dict may lack (rotary frequencies, position ids), are
    created as usual. accelerate's ``init_empty_weights()`` with ``include_buffers=False``."""
    register = nn.Module.register_parameter

    def register_on_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            p = module._parameters[name]
            module._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def save_converted(model: nn.Module, path: str | os.PathLike) -> None:
    """Writes ``model``'s state_dict to ``path``: safetensors when it ends in ``.safetensors``,
    else ``torch.save``. A tensor shared by several names (tied weights) is written once (under
    its first name; :func:`load_converted` ties it again); for safetensors, which stores one
    tensor per storage, views into a larger tensor (the fused decoder layers' projections) are
    written as copies."""
    state, seen = {}, set()
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:
            continue
        seen.add(id(t))
        state[name] = t.detach()
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file

        state = {k: (v if v.is_contiguous() and v.untyped_storage().nbytes() == v.nbytes
                     and v.storage_offset() == 0 else v.clone()) for k, v in state.items()}
        save_file(state, path, metadata={"format": "pt"})
    else:
        torch.save(state, path)


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A file written by torch.save (a state_dict) or safetensors, or a save_pretrained folder
    (model.safetensors, sharded or not, or pytorch_model.bin)."""
    if os.path.isdir(path):
        for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            if os.path.exists(os.path.join(path, index)):
                with open(os.path.join(path, index)) as f:
                    files = sorted(set(json.load(f)["weight_map"].values()))
                out = {}
                for name in files:
                    out.update(_read_state_dict(os.path.join(path, name)))
                return out
        for name in ("model.safetensors", "pytorch_model.bin"):
            if os.path.exists(os.path.join(path, name)):
                return _read_state_dict(os.path.join(path, name))
        raise FileNotFoundError(f"fastattn.load_converted: no model.safetensors or "
                                f"pytorch_model.bin in {path!r}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
        raise TypeError(f"fastattn.load_converted: {path!r} holds a {type(state).__name__}, "
                        "not a state_dict")
    return dict(state)


def _transformers_model(folder: str, dtype):
    """The folder's transformers model (config.json), built with empty weights."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder)
    archs = getattr(config, "architectures", None) or []
    cls = getattr(transformers, archs[0], None) if archs else None
    if cls is None:
        raise ValueError(f"fastattn.load_converted: config.json in {folder!r} names no "
                         f"transformers model class (architectures={archs!r})")
    if dtype is None:
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"  # renamed in 4.56
    with empty_weights():
        model = cls._from_config(config, **{key: dtype or torch.float32})
    return model.eval(), getattr(config, "fastattn", None)


def _tie_groups(model: nn.Module) -> list[list[str]]:
    """Names of parameters/buffers that are one tensor in ``model`` (tied weights)."""
    groups: dict[int, list[str]] = {}
    for name, t in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(t), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def _kind(t: torch.Tensor) -> str:
    return "float" if t.is_floating_point() else str(t.dtype).removeprefix("torch.")


def _check_matches(model: nn.Module, state: Mapping[str, torch.Tensor], ties) -> None:
    """Raises when the saved tensors are not the converted model's: other names, or int8 where
    the model holds floats (a conversion with other arguments)."""
    expected = model.state_dict()
    saved_once = {n for names in ties if any(m in state for m in names) for n in names}
    missing = sorted(k for k in expected if k not in state and k not in saved_once)
    unexpected = sorted(k for k in state if k not in expected)
    kinds = sorted(f"{k} ({_kind(state[k])} saved, {_kind(expected[k])} here)"
                   for k in expected if k in state and _kind(state[k]) != _kind(expected[k]))
    if missing or unexpected or kinds:
        parts = [f"{what}: {names[:6]}" + (f" and {len(names) - 6} more" if len(names) > 6 else "")
                 for what, names in (("missing", missing), ("unexpected", unexpected),
                                     ("other dtype", kinds)) if names]
        raise RuntimeError("fastattn.load_converted: the saved tensors are not those of the "
                           "converted model (" + "; ".join(parts) + "); was it converted with "
                           "other arguments? pass attention=, layer_norm=, int8= as convert had")


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    owner, _, attr = name.rpartition(".")
    module = model.get_submodule(owner)
    if attr in module._parameters:
        module._parameters[attr] = value
    else:
        module._buffers[attr] = value


def load_converted(
    source: str | os.PathLike | Mapping[str, torch.Tensor],
    model: nn.Module | None = None,
    *,
    attention: bool | None = None,
    layer_norm: bool | None = None,
    int8: bool | str | None = None,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> nn.Module:
    """A converted model, loaded from what a converted model saved, without a float checkpoint.

    Args:
        source: a folder written by ``save_pretrained`` of a converted ``transformers`` model
            (config.json says the architecture and how it was converted), a file written by
            ``torch.save(model.state_dict())`` or ``safetensors.torch.save_model``, or a
            state_dict.
        model: the unconverted architecture, needed unless ``source`` is a transformers folder.
            Its parameters are not used: build it under :func:`empty_weights` (or accelerate's
            ``init_empty_weights()``) so that none are allocated. Buffers the state_dict lacks
            (non-persistent ones) must not be on the meta device.
        attention, layer_norm, int8, filter_fn: ``fastattn.convert``'s arguments, as the saved
            model was converted; None takes them from the folder's config.json (``convert``
            wrote them there), else convert's defaults. A ``filter_fn`` is not saved: pass it
            again.
        dtype: for a transformers folder, the dtype to build the model in (default: the
            config's); the loaded tensors keep the dtype they were saved in.
        device: where the loaded tensors go (default: the CPU).

    Returns the converted model, in eval mode, holding the loaded tensors (tied parameters stay
    tied; an lm_head converted to int8 holds its own int8 copy, as after ``convert``).
    """
    import fastattn

    saved_args = None
    path = None
    if isinstance(source, Mapping):
        state = dict(source)
    else:
        path = os.fspath(source)
        if model is None:
            if not os.path.exists(os.path.join(path, "config.json")):
                raise ValueError("fastattn.load_converted: pass model= (the architecture, built "
                                 "under fastattn.checkpoint.empty_weights()) unless source is a "
                                 "save_pretrained folder with a config.json")
            model, saved_args = _transformers_model(path, dtype)
        state = _read_state_dict(path)
    if model is None:
        raise ValueError("fastattn.load_converted: a state_dict source needs model=")
    saved_args = dict(saved_args or {})
    if saved_args.pop("filter_fn", False) and filter_fn is None:
        raise ValueError("fastattn.load_converted: the model was converted with a filter_fn; "
                         "pass the same filter_fn")
    given = {"attention": attention, "layer_norm": layer_norm, "int8": int8}
    args = {k: (v if v is not None else saved_args.get(k, {"int8": False}.get(k, True)))
            for k, v in given.items()}
    model = fastattn.convert(model, **args, filter_fn=filter_fn)

    ties = _tie_groups(model)
    _check_matches(model, state, ties)
    model.load_state_dict(state, strict=False, assign=True)
    for names in ties:
        # a tied weight saved once (safetensors and save_pretrained drop the duplicates): every
        # name of the group is given the one tensor that was loaded
        present = [n for n in names if n in state]
        loaded = model.get_parameter(present[0])
        for n in names:
            _set_tensor(model, n, loaded)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
            if t.is_meta]
    if left:
        raise RuntimeError(f"fastattn.load_converted: {left[:8]} are still on the meta device "
                           "(build the model with its buffers on a real device)")
    if device is not None:
        model.to(device)
    return model.eval()
