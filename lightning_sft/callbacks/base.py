"""``SFTCallback``: what every callback of this package shares.

- It declares the strategies it runs under (``strategies``, ``strategy_refusal``; see
  :mod:`lightning_sft.strategies`), checked for all of them by whichever sets up first.
- A fit that fails before training starts leaves the user's module as it was. The first of our
  callbacks to set up takes a restore point of the module and of every one of our callbacks
  (:mod:`lightning_sft.restore_point`); the first to see the exception restores it, whichever
  callback raised and in whichever order they were listed. Training starts at the first backward
  pass; from then on the module keeps what the fit made of it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from types import MappingProxyType
from typing import Protocol

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_sft.restore_point import RestorePoint
from lightning_sft.strategies import ALL_KINDS, check_strategies

# Lightning's own attributes on a LightningModule (the trainer, the current hook, ...), which it keeps
# updating itself: a restore point leaves them alone.
_LIGHTNING_ATTRIBUTES = frozenset(vars(pl.LightningModule())) - frozenset(vars(nn.Module()))
# Where a Trainer holds its fit's restore point, while the fit has not started training.
_POINT = "_lightning_sft_restore_point"


class ForwardWrapper(Protocol):
    """Something installed over block forwards (layer dropout's dropper, activation offloading): ``remove``
    restores the forwards it found, ``install`` wraps the forwards the blocks have now and stamps
    ``installed_at`` (``anatomy.modules.install_stamp``), which orders the wrappers from inner to outer."""

    installed_at: int

    def install(self) -> None: ...

    def remove(self) -> None: ...


class SFTCallback(Callback):
    """Base of this package's callbacks: declared strategies and the undo of a failed set-up.

    A subclass calls ``self.begin_setup(trainer, pl_module, stage)`` first in its ``setup``, before
    changing anything, and calls ``super()`` in the hooks below if it overrides them.
    """

    strategies: frozenset[str] = ALL_KINDS
    strategy_refusal: str = ""
    # The callbacks of ours (by class name) this one cannot run with, and why; those it cannot run with
    # under a setting of its own, as (the setting, why); those it needs, and why.
    excludes: Mapping[str, str] = MappingProxyType({})
    excludes_when: Mapping[str, tuple[str, str]] = MappingProxyType({})
    requires: Mapping[str, str] = MappingProxyType({})

    def conflict_with(self, other: SFTCallback) -> str | None:
        """Why this callback cannot run with ``other`` (None: it can). ``excludes`` always applies; a
        subclass declaring ``excludes_when`` says here whether its settings make the conflict."""
        return type(self).excludes.get(type(other).__name__)

    def run_label(self) -> str:
        """How a run names this callback in its summary and in the report's legend ("" leaves it out)."""
        return type(self).__name__

    def forward_wrappers(self) -> list[ForwardWrapper]:
        """What this callback installed over the module's block forwards; a callback that changes those
        forwards takes them off first and puts them back after, so they stay outermost."""
        return []

    def required(self, trainer: pl.Trainer, name: str) -> SFTCallback:
        """The callback named in ``requires`` (``check_combination`` refused a fit without it)."""
        if name not in type(self).requires:
            raise KeyError(f"{type(self).__name__} does not declare {name!r} in `requires`.")
        return next(cb for cb in trainer.callbacks if type(cb).__name__ == name)

    def begin_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Refuse an unsupported strategy or combination, then (once per fit) take the restore point."""
        check_strategies(trainer)
        ours = [cb for cb in trainer.callbacks if isinstance(cb, SFTCallback)]
        check_combination(ours)
        if stage == "fit" and getattr(trainer, _POINT, None) is None:
            setattr(trainer, _POINT, RestorePoint(pl_module, ours, keep_root=_LIGHTNING_ATTRIBUTES))

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        setattr(trainer, _POINT, None)  # training has started: the module keeps what the fit does to it

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        setattr(trainer, _POINT, None)  # a fit that never trained (max_steps=0) ended normally

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        point = getattr(trainer, _POINT, None)
        setattr(trainer, _POINT, None)
        if point is not None:
            point.restore()


@contextmanager
def beneath_forward_wrappers(trainer: pl.Trainer, leaving: ForwardWrapper | None = None) -> Iterator[None]:
    """Change block forwards beneath what our callbacks installed over them: the wrappers come off, outermost
    first, and go back on over the new forwards in the order they had, whatever the callback order.
    ``leaving`` comes off and stays off (a callback's teardown)."""
    wrappers = [w for cb in trainer.callbacks if isinstance(cb, SFTCallback) for w in cb.forward_wrappers()]
    wrappers.sort(key=lambda wrapper: wrapper.installed_at)
    for wrapper in reversed(wrappers):
        wrapper.remove()
    try:
        yield
    finally:
        for wrapper in wrappers:
            if wrapper is not leaving:
                wrapper.install()


def run_name(callbacks: list[Callback]) -> str:
    """A run's name from the methods its callbacks apply, e.g. ``"LoRA r=16 + sparsity svd 0.5"``."""
    labels = [cb.run_label() for cb in callbacks if isinstance(cb, SFTCallback)]
    return " + ".join(label for label in labels if label) or "no method"


def check_combination(ours: list[SFTCallback]) -> None:
    """Refuse, from the callbacks' declarations, one added twice, one missing what it needs, or two that
    cannot run together; whichever callback sets up first, before any has changed the module."""
    for cls, count in Counter(type(cb) for cb in ours).items():
        if count > 1:
            raise ValueError(f"{cls.__name__} was added {count} times; keep exactly one in `callbacks`.")
    present = {type(cb).__name__ for cb in ours}
    for callback in ours:
        for name, why in type(callback).requires.items():
            if name not in present:
                raise ValueError(f"{type(callback).__name__} needs {name}: {why}")
        for other in ours:
            why = None if other is callback else callback.conflict_with(other)
            if why:
                raise ValueError(f"{type(callback).__name__} cannot run with {type(other).__name__}: {why}")


def compatibility_table(callbacks: list[type[SFTCallback]]) -> str:
    """The markdown matrix of which of our callbacks run together, from their declarations."""

    def cell(cls: type[SFTCallback], other: type[SFTCallback]) -> str:
        if other is cls:
            return "once"
        if other.__name__ in cls.requires:
            return "needs it"
        if cls.__name__ in other.requires:
            return "yes"
        if other.__name__ in cls.excludes or cls.__name__ in other.excludes:
            return "no"
        when = [owner.excludes_when[peer.__name__][0] for owner, peer in ((cls, other), (other, cls))
                if peer.__name__ in owner.excludes_when]
        return f"not with {when[0]}" if when else "yes"

    lines = ["| | " + " | ".join(f"`{c.__name__}`" for c in callbacks) + " |", "|---|" + "---|" * len(callbacks)]
    lines += [f"| `{c.__name__}` | " + " | ".join(cell(c, o) for o in callbacks) + " |" for c in callbacks]
    return "\n".join(lines)
