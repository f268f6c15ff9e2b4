"""Backbones: timm's registry is the one backbone registry.

Importing this package registers the CIFAR ResNets into timm. Any timm model
name works; :data:`BENCHMARK_BACKBONES` are the ones this benchmark tests.
"""
from __future__ import annotations

import difflib
import pickle
import re
from pathlib import Path
from typing import Optional

import numpy as np
import timm
import torch
import torch.nn as nn

from manidp._defaults import BENCHMARK_BACKBONES
from manidp.errors import UserError
from manidp.models import cifar_resnet  # noqa: F401  (registers into timm)

__all__ = ["BENCHMARK_BACKBONES", "build_backbone", "load_state_file", "native_input_size"]


# Files written before the engine stored plain floats hold numpy float scalars (learning rates in the
# optimizer and scheduler state): rebuilding one from its dtype and bytes runs no code, so they stay readable.
_NUMPY_SCALARS = [np._core.multiarray.scalar, np.dtype, *(type(np.dtype(t)) for t in ("f8", "f4", "i8", "i4", "b1"))]


def load_state_file(path: str | Path) -> dict:
    """Read a model, checkpoint or pretrained file without running anything it holds.

    Every file the benchmark writes is plain data (dicts, lists, numbers,
    strings, tensors), so torch's weights-only unpickler reads all of them; a
    pickle that names any other Python object (which a full unpickler would
    call, e.g. ``os.system``) is refused before it is called. Files are shared
    between users (run folders, checkpoints, cluster homes), so loading must
    never be a way to run code. Corrupt, foreign and unsafe files each raise
    one clear UserError.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint file not found: {path}")
    try:
        with torch.serialization.safe_globals(_NUMPY_SCALARS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights_only" not in str(err) and "Weights only" not in str(err):
            raise UserError(f"checkpoint {path} is corrupt or not a PyTorch checkpoint ({err}); "
                            "delete it to start over, or point to a good file") from None
        found = _unsafe_global(str(err))
        raise UserError(
            f"refused to load {path}: it is not a plain state file (it holds the Python object "
            f"{found}, which loading would execute); nothing in it was run. Re-save it as a state dict "
            "(torch.save(model.state_dict(), FILE)) or point to a file the benchmark wrote"
        ) from None
    except Exception as err:  # torch raises many types for a damaged file
        raise UserError(
            f"checkpoint {path} is corrupt or not a PyTorch checkpoint ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); delete it to start over, or point to a good file"
        ) from None


def _unsafe_global(message: str) -> str:
    """The global torch's weights-only unpickler stopped at, read from its message, for the one-line error."""
    match = re.search(r"GLOBAL ([\w.]+)", message)
    return match.group(1) if match else "(not a tensor or plain data)"


def _state_dict_of(obj, path) -> dict:
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    elif isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"checkpoint {path} holds no model state dict")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def build_backbone(
    name: str, num_classes: Optional[int] = None, in_chans: int = 3, pretrained: Optional[str] = None
) -> nn.Module:
    """Create ``name`` from timm; ``pretrained`` is None, "hub" or a local checkpoint file.

    ``num_classes`` None keeps the backbone's own head: 10 classes for the
    CIFAR ResNets, 1000 for the ImageNet models.
    """
    head = {} if num_classes is None else {"num_classes": num_classes}
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UserError(
            f"unknown backbone '{name}'{hint}; benchmark backbones: {', '.join(BENCHMARK_BACKBONES)}; "
            "any name from timm.list_models() also works"
        )
    if pretrained == "hub":
        try:
            return timm.create_model(name, pretrained=True, in_chans=in_chans, **head)
        except Exception as err:
            raise UserError(
                f"could not load timm hub weights for '{name}' ({type(err).__name__}: {str(err)[:200]}); "
                "without network, download the weights elsewhere and set 'pretrained' to the local file"
            ) from None
    model = timm.create_model(name, pretrained=False, in_chans=in_chans, **head)
    if pretrained:
        state = _state_dict_of(load_state_file(pretrained), pretrained)
        own = model.state_dict()
        mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
        classifier = model.get_classifier()
        head = {f"{n}.{p}" for n, m in model.named_modules() if m is classifier for p, _ in m.named_parameters()}
        if set(mismatched) - head:
            raise UserError(f"checkpoint {pretrained} does not fit backbone '{name}': shapes differ at {mismatched[:3]}")
        for k in mismatched:  # a new number of classes: keep the fresh classifier
            state.pop(k)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if set(missing) - head or unexpected:
            raise UserError(
                f"checkpoint {pretrained} does not fit backbone '{name}': "
                f"missing {sorted(set(missing) - head)[:3]}, unexpected {sorted(unexpected)[:3]}"
            )
    return model


def native_input_size(model: nn.Module) -> Optional[int]:
    """The input side a backbone was designed for (timm's pretrained config; 32 for the CIFAR ResNets)."""
    size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size")
    return int(size[-1]) if size else None
