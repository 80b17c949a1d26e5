"""``callbacks.base.beneath_forward_wrappers``: whatever order the callbacks are listed in, the wrappers over
block forwards come off outermost first and go back on in the order they had, and a teardown's ``leaving``
stays off."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from lightning_sft.anatomy.modules import install_stamp, instance_forward, restore_forward
from lightning_sft.callbacks.base import ForwardWrapper, SFTCallback, beneath_forward_wrappers


class Tag:
    """A forward wrapper that records its name when the forward runs."""

    def __init__(self, module: nn.Module, name: str, log: list[str]) -> None:
        self.module, self.name, self.log = module, name, log
        self.installed_at = 0

    def install(self) -> None:
        self.previous, inner = instance_forward(self.module), self.module.forward

        def forward(*args: Any) -> Any:
            self.log.append(self.name)
            return inner(*args)

        self.module.forward = forward
        self.installed_at = install_stamp()

    def remove(self) -> None:
        restore_forward(self.module, self.previous)


class Holder(SFTCallback):
    def __init__(self, wrapper: Tag) -> None:
        super().__init__()
        self.wrapper = wrapper

    def forward_wrappers(self) -> list[ForwardWrapper]:
        return [self.wrapper]


def _calls(module: nn.Module, log: list[str]) -> list[str]:
    log.clear()
    module(torch.ones(1, 2))
    return list(log)


def test_wrappers_come_off_outermost_first_and_go_back_in_their_order() -> None:
    module, log = nn.Linear(2, 2), []
    inner, outer = Tag(module, "inner", log), Tag(module, "outer", log)
    inner.install()
    outer.install()
    assert _calls(module, log) == ["outer", "inner"]
    trainer = SimpleNamespace(callbacks=[Holder(inner), Holder(outer)])  # listed inner first: not the nesting
    with beneath_forward_wrappers(trainer):
        assert "forward" not in vars(module)  # both off: the change happens on the bare forward
        Tag(module, "new", log).install()
    assert _calls(module, log) == ["outer", "inner", "new"]
    with beneath_forward_wrappers(trainer, leaving=inner):
        pass
    assert _calls(module, log) == ["outer", "new"]  # inner's teardown: it stays off, the others keep their order
