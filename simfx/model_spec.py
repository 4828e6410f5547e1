"""Model specs for the ``simfx`` command: ``torchvision:resnet50``, ``timm:convnext_tiny``,
``path/to/file.py:factory`` or ``package.module:factory``.

A factory is called with the ``--model-arg`` keyword arguments and returns a
module, or a ``(module, example_inputs)`` pair.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

__all__ = ["LoadedModel", "load_model", "parse_model_args", "parse_shape"]


class SpecError(ValueError):
    """A model spec, shape or argument the command cannot use."""


@dataclass
class LoadedModel:
    model: nn.Module
    name: str
    example_inputs: Any = None
    default_shape: tuple[int, ...] = (2, 3, 224, 224)


def parse_shape(text: str) -> tuple[int, ...]:
    """``"2,3,224,224"`` (or ``2x3x224x224``) -> ``(2, 3, 224, 224)``."""
    parts = text.replace("x", ",").split(",")
    try:
        shape = tuple(int(p) for p in parts if p.strip())
    except ValueError:
        raise SpecError(f"--input-shape takes comma-separated integers like 2,3,224,224; got {text!r}") from None
    if len(shape) < 2 or any(s < 1 for s in shape):
        raise SpecError(f"--input-shape needs a batch axis and at least one more positive size, got {text!r}")
    return shape


def parse_model_args(items: list[str] | None) -> dict[str, Any]:
    """``["image_size=64", "name=tiny"]`` -> ``{"image_size": 64, "name": "tiny"}`` (Python literals or strings)."""
    kwargs: dict[str, Any] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise SpecError(f"--model-arg takes KEY=VALUE, e.g. --model-arg image_size=64; got {item!r}")
        try:
            kwargs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            kwargs[key] = value
    return kwargs


def load_model(spec: str, kwargs: Mapping[str, Any] | None = None) -> LoadedModel:
    """Build the model a spec names (randomly initialised: nothing is downloaded)."""
    kwargs = dict(kwargs or {})
    source, sep, name = spec.partition(":")
    if not sep or not name or not source:
        raise SpecError(
            f"MODEL must look like torchvision:resnet50, timm:convnext_tiny or path/to/file.py:factory; got {spec!r}"
        )
    if source == "torchvision":
        return _torchvision(name, kwargs)
    if source == "timm":
        return _timm(name, kwargs)
    return _factory(source, name, kwargs, spec)


def _torchvision(name: str, kwargs: dict) -> LoadedModel:
    import torchvision

    available = torchvision.models.list_models()
    if name not in available:
        close = difflib.get_close_matches(name, available, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see torchvision.models.list_models()"
        raise SpecError(f"torchvision has no model {name!r}{hint}")
    try:
        model = torchvision.models.get_model(name, weights=None, **kwargs)
    except TypeError as error:
        raise SpecError(f"torchvision:{name} rejected --model-arg {kwargs}: {error}") from None
    image = kwargs.get("image_size", 299 if name == "inception_v3" else 224)
    return LoadedModel(model, name, default_shape=(2, 3, image, image))


def _timm(name: str, kwargs: dict) -> LoadedModel:
    try:
        import timm
    except ImportError:
        raise SpecError("timm is not installed; pip install timm, or use a torchvision: or file.py: model") from None
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
        raise SpecError(f"timm has no model {name!r}{hint}")
    model = timm.create_model(name, pretrained=False, **kwargs)
    size = tuple(getattr(model, "pretrained_cfg", {}).get("input_size", (3, 224, 224)))
    return LoadedModel(model, name, default_shape=(2, *size))


def _factory(source: str, attr: str, kwargs: dict, spec: str) -> LoadedModel:
    if source.endswith(".py") or "/" in source or "\\" in source:
        path = Path(source)
        if not path.is_file():
            raise SpecError(f"no such file {source!r} (from MODEL {spec!r})")
        module_name = f"simfx_user_{path.stem}"
        loader_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[module_name] = module  # dataclasses and pickling look modules up by name
        loader_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(source)
        except ImportError as error:
            raise SpecError(f"cannot import {source!r} (from MODEL {spec!r}): {error}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        names = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise SpecError(f"{source} has no callable {attr!r}; callables there: {', '.join(names[:12]) or 'none'}")
    made = factory(**kwargs)
    example = None
    if isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], nn.Module):
        made, example = made
    if not isinstance(made, nn.Module):
        raise SpecError(f"{spec} returned {type(made).__name__}; a factory must return an nn.Module "
                        f"or a (module, example_inputs) pair")
    if isinstance(example, torch.Tensor):
        example = (example,)
    return LoadedModel(made, attr, example_inputs=example)
