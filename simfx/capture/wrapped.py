"""Models that arrive wrapped: what simfx can transform through, and what it refuses.

Wrappers change how a model runs (gradient synchronisation, sharding, compiled
code), so transforming the wrapper would either fail deep inside tracing or,
worse, trace around what the wrapper does (DDP's gradient all-reduce) and train
each rank on its own. The rule: transform the plain module, then wrap the
result, as ``simfx.transform``'s docs show for DDP, FSDP2 and ``torch.compile``.
"""

from __future__ import annotations

import warnings

from torch import nn

from ..errors import UnsupportedModelError

__all__ = ["unwrapped_model"]


def unwrapped_model(model: nn.Module) -> nn.Module:
    """``model`` itself, its original module for a ``torch.compile``-d one, or a clear error."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"simfx expects a torch.nn.Module, got {type(model).__name__}.")
    kind = _wrapper_kind(model)
    if kind == "compiled":
        warnings.warn(
            "simfx.transform got a torch.compile-d module; it transforms the original module "
            "(model._orig_mod) and returns an uncompiled one. Compile the result: "
            "step = torch.compile(simfx.transform(model, example_inputs)).",
            stacklevel=3,
        )
        return unwrapped_model(model._orig_mod)
    if kind in ("DistributedDataParallel", "DataParallel"):
        raise UnsupportedModelError(
            f"simfx.transform got a {kind}-wrapped model; it would trace around the wrapper's gradient "
            f"synchronisation. Transform the inner module, then wrap the result: "
            f"sim = simfx.transform(model.module, example_inputs); model = {kind}(sim, ...)."
        )
    if kind == "FullyShardedDataParallel":
        raise UnsupportedModelError(
            "simfx.transform got an FSDP-wrapped model; transform the plain module first, then wrap the "
            "result (or call fully_shard on its blocks and on the transformed module)."
        )
    if kind == "ScriptModule":
        raise UnsupportedModelError(
            f"simfx.transform got a TorchScript module ({type(model).__name__}); simfx rewrites Python "
            f"modules. Transform the nn.Module you scripted, then script or export the stripped model "
            f"(simfx.strip(sim)) for deployment."
        )
    sharded = next((name for name, m in model.named_modules() if _wrapper_kind(m) == "fully_shard"), None)
    if sharded is not None:
        where = f"'{sharded}'" if sharded else "the model"
        raise UnsupportedModelError(
            f"fully_shard was applied to {where} before simfx.transform; its parameters are sharded "
            f"DTensors simfx cannot trace. Transform first, then call fully_shard on the blocks and on "
            f"the transformed module."
        )
    return model


def _wrapper_kind(module: nn.Module) -> str:
    names = {klass.__name__ for klass in type(module).__mro__}
    if "OptimizedModule" in names and hasattr(module, "_orig_mod"):
        return "compiled"
    for name in ("DistributedDataParallel", "DataParallel", "FullyShardedDataParallel"):
        if name in names:
            return name
    if "FSDPModule" in names:
        return "fully_shard"
    if "ScriptModule" in names or "RecursiveScriptModule" in names:
        return "ScriptModule"
    return ""
