"""megatron-core's optimizer state in training checkpoints: which kind of optimizer, whether it
has state yet, and the workarounds megatron-core 0.16 needs on its torch-Adam path (no Transformer
Engine / apex) to save and load a DistributedOptimizer exactly. Used by checkpoint.py.
"""

from __future__ import annotations

import contextlib

import torch


def optimizer_kind(optimizer) -> str | None:
    """'distributed' (megatron DistributedOptimizer), 'plain' (model-space state), None (no optimizer)."""
    if optimizer is None:
        return None
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    return "distributed" if any(isinstance(o, DistributedOptimizer) for o in inner) else "plain"


def optimizer_has_state(optimizer) -> bool:
    """Whether the optimizer has stepped (Adam moments exist) on every rank (collective).

    Before its first step megatron's torch-Adam path cannot build a state dict; such an optimizer
    is saved as 'empty' and a resume simply starts with a fresh one - the same thing."""
    import torch.distributed as dist

    inner = [getattr(o, "optimizer", None) for o in getattr(optimizer, "chained_optimizers", [optimizer])]
    local = all(opt is None or len(opt.state) > 0 or not any(g["params"] for g in opt.param_groups)
                for opt in inner)
    flag = torch.tensor([1 if local else 0], dtype=torch.int32,
                        device="cuda" if torch.cuda.is_available() else "cpu")  # nccl reduces on the GPU
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def prepare_optimizer_for_load(optimizer) -> None:
    """Give a never-stepped DistributedOptimizer a (zero) state to be overwritten by the load.

    On the torch-Adam fallback (no Transformer Engine / apex) megatron 0.16 builds the load state
    dict from `state_dict()`, which asserts that every parameter has a step: with no state yet it
    fails. Moments and step created here are replaced by the checkpoint's."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if not isinstance(opt, DistributedOptimizer) or inner is None or len(inner.state) > 0:
            continue
        if getattr(opt, "init_state_fn", None) is None:
            continue
        opt.init_state_fn(inner, opt.config)
        for state in inner.state.values():
            state.setdefault("step", torch.tensor(0.0))


def restore_steps(optimizer) -> None:
    """Give every parameter its own, correct Adam `step` after a DistributedOptimizer load.

    On the torch-Adam path megatron 0.16 (dp_reshardable) restores the step into the param groups
    and then overwrites the per-parameter step with the value it had before the load (0 for a fresh
    optimizer); where it does set it, all parameters share one tensor, which torch's Adam would
    advance once per parameter per update. The param groups hold the saved step: use it."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if not isinstance(opt, DistributedOptimizer) or inner is None:
            continue
        steps = {float(g["step"]) for g in inner.param_groups if g["params"] and g.get("step") is not None}
        saved = next(iter(steps)) if len(steps) == 1 else None
        for state in inner.state.values():
            step = state.get("step")
            if isinstance(step, torch.Tensor):
                state["step"] = step.clone() if saved is None else torch.tensor(saved, dtype=step.dtype,
                                                                                device=step.device)


@contextlib.contextmanager
def tolerate_missing_step(optimizer):
    """While loading: let megatron's copy into the torch-Adam state skip the `step` that the
    fully_reshardable format does not store (megatron 0.16 raises KeyError on the torch-Adam path;
    with Transformer Engine / apex there is no per-parameter step). `restore_steps` sets it after."""
    from megatron.core.optimizer import distrib_optimizer

    patched = []
    if not distrib_optimizer.HAVE_APEX_OR_TE:
        for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
            if isinstance(opt, distrib_optimizer.DistributedOptimizer):
                original = opt._set_main_param_and_optimizer_states

                def setter(model_param, tensors, _original=original):
                    if "step" not in tensors:
                        tensors = {**tensors, "step": torch.zeros(())}
                    _original(model_param, tensors)

                opt._set_main_param_and_optimizer_states = setter
                patched.append(opt)
    try:
        yield
    finally:
        for opt in patched:
            del opt._set_main_param_and_optimizer_states


def optimizer_metadata(kind: str | None, optimizer_format: str) -> dict:
    # megatron's own training metadata (0.16): no singleton shards, no per-chain prefix.
    meta: dict = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
    if kind == "distributed":
        meta["distrib_optim_sharding_type"] = optimizer_format
    return meta
