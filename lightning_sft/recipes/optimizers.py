"""8-bit optimizer states: the bitsandbytes counterpart of a torch optimizer, with the same parameter
groups and hyperparameters.

Pure torch and bitsandbytes (no Lightning). Adam keeps two fp32 states per parameter (8 bytes); the
8-bit optimizers keep them as uint8 with one fp32 scale (absmax) per block of 256 values, about 2.03
bytes per parameter (SGD with momentum: one state, 4 -> about 1.02 bytes). bitsandbytes keeps fp32 states
for tensors with fewer than ``min_8bit_size`` elements (default 4096): biases, norms and small LoRA
factors (``r x 256`` at r=8 has 2048), whose quantisation error is not worth the few bytes.
"""

from __future__ import annotations

import weakref
from functools import wraps
from typing import Any

import torch
from torch.optim import Optimizer

DEFAULT_MIN_8BIT_SIZE = 4096
# Group options bitsandbytes has no equivalent of; each must have its torch default to convert.
_REFUSED_OPTIONS = {
    "amsgrad": (False, "bitsandbytes has no 8-bit AMSGrad"),
    "maximize": (False, "negate the loss instead"),
    "differentiable": (False, "bitsandbytes steps are not differentiable"),
    "nesterov": (False, "bitsandbytes' 8-bit SGD has plain momentum only"),
    "dampening": (0, "bitsandbytes' 8-bit SGD has no dampening"),
}
# torch-only switches that choose a kernel or a variant handled above; dropped from the groups.
_TORCH_ONLY = {"foreach", "fused", "capturable", "decoupled_weight_decay", "momentum", *_REFUSED_OPTIONS}


def _bitsandbytes() -> Any:
    try:
        import bitsandbytes
    except ImportError as error:
        raise ImportError(
            f"8-bit optimizers need bitsandbytes ({error}); install it with `pip install bitsandbytes` (>= 0.50 runs"
            " its optimizers on CPU too)."
        ) from None
    return bitsandbytes


def is_bitsandbytes_optimizer(optimizer: Optimizer) -> bool:
    """Whether ``optimizer`` is already a bitsandbytes one (8- or 32-bit states)."""
    return isinstance(optimizer, _bitsandbytes().optim.optimizer.Optimizer8bit)


def eight_bit_optimizer(optimizer: Optimizer, min_8bit_size: int = DEFAULT_MIN_8BIT_SIZE) -> Optimizer:
    """A new bitsandbytes 8-bit optimizer over ``optimizer``'s parameter groups, hyperparameters included.

    ``torch.optim.Adam`` -> ``Adam8bit``, ``AdamW`` -> ``AdamW8bit``, ``SGD`` with momentum -> ``SGD8bit``.
    Every group keeps its parameters, ``lr`` (and ``initial_lr`` set by an LR scheduler), ``betas``,
    ``eps``, ``weight_decay`` and any option of its own. ``optimizer`` is not changed; convert it before
    its first step (existing fp32 states are not converted). Tensors with fewer than ``min_8bit_size``
    elements keep fp32 states.
    """
    if isinstance(min_8bit_size, bool) or not isinstance(min_8bit_size, int) or min_8bit_size < 0:
        raise ValueError(f"`min_8bit_size` must be an integer >= 0; got {min_8bit_size!r}. The default is 4096.")
    bnb = _bitsandbytes()
    if is_bitsandbytes_optimizer(optimizer):
        raise ValueError(f"{type(optimizer).__name__} is already a bitsandbytes optimizer.")
    kinds = {
        torch.optim.Adam: bnb.optim.Adam8bit,
        torch.optim.AdamW: bnb.optim.AdamW8bit,
        torch.optim.SGD: bnb.optim.SGD8bit,
    }
    target = kinds.get(type(optimizer))
    if target is None:
        raise TypeError(
            f"No 8-bit counterpart for {type(optimizer).__name__}: Adam, AdamW and SGD with momentum are converted."
            " Build a bitsandbytes optimizer (bitsandbytes.optim.*8bit) in configure_optimizers instead."
        )
    if optimizer.state:
        raise ValueError(
            f"The {type(optimizer).__name__} has taken steps (it holds state); convert it before its first step."
        )
    groups = [_group(optimizer, index, group) for index, group in enumerate(optimizer.param_groups)]
    # The defaults only fill groups added later (add_param_group); each group carries its own values.
    first = groups[0]
    if type(optimizer) is torch.optim.SGD:
        defaults = {"momentum": first["betas"][0]}
    else:
        defaults = {"betas": first["betas"], "eps": first["eps"]}
    return target(groups, lr=first["lr"], weight_decay=first["weight_decay"], min_8bit_size=min_8bit_size, **defaults)


def _group(optimizer: Optimizer, index: int, group: dict[str, Any]) -> dict[str, Any]:
    """Group ``index`` in bitsandbytes' terms (SGD momentum is its ``betas[0]``); refuses what it cannot run."""
    name = type(optimizer).__name__
    for option, (default, hint) in _REFUSED_OPTIONS.items():
        if option in group and group[option] != default:
            raise ValueError(f"{name} param group {index} has {option}={group[option]!r}: {hint}.")
    for option in ("lr", "eps", "weight_decay", "betas"):
        values = group.get(option, ())
        if any(isinstance(value, torch.Tensor) for value in (values if isinstance(values, tuple) else (values,))):
            raise ValueError(f"{name} param group {index} has a tensor {option}; bitsandbytes reads Python floats.")
    converted = {key: value for key, value in group.items() if key not in _TORCH_ONLY}
    if type(optimizer) is torch.optim.SGD:
        if not group["momentum"]:
            raise ValueError(
                f"SGD param group {index} has no momentum, hence no state to shrink: keep the plain SGD."
            )
        converted.update(betas=(group["momentum"], 0.0), eps=0.0)
    elif type(optimizer) is torch.optim.Adam and group["weight_decay"] and not group.get("decoupled_weight_decay"):
        raise ValueError(
            f"Adam param group {index} has weight_decay={group['weight_decay']} added to the gradient (L2), while"
            " bitsandbytes decays the weights directly (AdamW). Use torch.optim.AdamW, or weight_decay=0."
        )
    return converted


def rebind_scheduler(scheduler: Any, old: Optimizer, new: Optimizer) -> None:
    """Point an LR scheduler (and the schedulers it chains) built on ``old`` at ``new``.

    Schedulers read and write ``optimizer.param_groups`` through their ``optimizer`` attribute; their
    ``base_lrs`` come from the groups' ``initial_lr``, which ``eight_bit_optimizer`` carries over. torch's
    LRScheduler also wraps ``optimizer.step`` to check the call order; ``new.step`` gets the same wrapper.
    """
    for key, value in vars(scheduler).items():
        if value is old:
            setattr(scheduler, key, new)
        elif isinstance(value, (list, tuple)):
            for item in value:
                if isinstance(item, (torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)):
                    rebind_scheduler(item, old, new)
    if isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler):
        _track_step_called(new)
        new._opt_called = getattr(old, "_opt_called", False)


def _track_step_called(optimizer: Optimizer) -> None:
    """torch's ``LRScheduler`` wrapper of ``optimizer.step`` (marks ``_opt_called``), installed once."""
    if hasattr(optimizer.step, "_wrapped_by_lr_sched"):
        return
    step = optimizer.step.__func__
    reference = weakref.ref(optimizer)

    @wraps(step)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        opt = reference()
        opt._opt_called = True
        return step.__get__(opt, type(opt))(*args, **kwargs)

    wrapper._wrapped_by_lr_sched = True
    optimizer.step = wrapper
