"""Which strategies each callback runs under: declared on the callback, checked in one place before any
callback changes the module, and printed in docs/distributed.md (``LSFT_WRITE_DOCS=1 python3 -m pytest
tests/test_strategies.py`` rewrites the table)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
)

from generated_docs import check_generated
import lightning_sft.callbacks as callbacks
from lightning_sft import LoRA, lora_layers
from lightning_sft.modules import CausalLM
from lightning_sft.strategies import (
    ALL_KINDS,
    DDP,
    DEEPSPEED,
    FSDP,
    FSDP2,
    SINGLE,
    FSDP2Strategy,
    check_strategies,
    strategy_kind,
    support_table,
)

CALLBACKS = [getattr(callbacks, name) for name in callbacks.__all__]


def test_every_callback_declares_its_strategies() -> None:
    assert CALLBACKS
    for callback in CALLBACKS:
        assert isinstance(callback.strategies, frozenset) and callback.strategies <= ALL_KINDS, callback
        assert {SINGLE, DDP} <= callback.strategies, callback  # everything runs on one device and under DDP
        # A refusal says why; a callback that runs everywhere has nothing to say.
        assert bool(callback.strategy_refusal) == (callback.strategies != ALL_KINDS), callback


@pytest.mark.parametrize(
    ("strategy", "kind"),
    [
        (SingleDeviceStrategy(device=torch.device("cpu")), SINGLE), (DDPStrategy(), DDP), (FSDP2Strategy(), FSDP2),
        (ModelParallelStrategy(), FSDP2), (FSDPStrategy(), FSDP),
    ],
    ids=lambda value: value if isinstance(value, str) else type(value).__name__,
)
def test_strategy_kinds(strategy: object, kind: str) -> None:
    assert strategy_kind(strategy) == kind


def test_deepspeed_is_its_own_kind_though_it_subclasses_ddp() -> None:
    assert issubclass(DeepSpeedStrategy, DDPStrategy)
    assert strategy_kind(type("DeepSpeedStrategy", (DDPStrategy,), {})()) == DEEPSPEED


def test_an_unknown_strategy_is_refused_by_name_before_any_change() -> None:
    class Custom:
        pass

    lora, module = LoRA(r=2), CausalLM(model="tiny-llama")
    trainer = SimpleNamespace(strategy=Custom(), callbacks=[lora])
    with pytest.raises(RuntimeError, match=r"LoRA cannot tell how Custom holds the module's weights: .* 'fsdp2'"):
        lora.setup(trainer, module, "fit")
    assert not lora_layers(module)


def test_whichever_callback_checks_first_refuses_for_all_of_them() -> None:
    refused = [cb for cb in CALLBACKS if FSDP2 not in cb.strategies]
    assert refused  # AdaptiveRankSearch and EightBitOptimizer need plain parameters
    trainer = SimpleNamespace(strategy=FSDP2Strategy(), callbacks=[cb.__new__(cb) for cb in refused])
    with pytest.raises(RuntimeError, match=f"{refused[0].__name__} does not run under FSDP2"):
        check_strategies(trainer)


def test_the_docs_table_is_generated_from_the_declarations() -> None:
    check_generated("distributed.md", "strategy table", support_table(CALLBACKS), "tests/test_strategies.py")
