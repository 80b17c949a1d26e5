"""A fit that fails before training starts leaves the user's module as it was, whichever of our callbacks
refused and in whichever order the callbacks were listed: parameters, buffers, ``state_dict`` keys,
``requires_grad`` flags, module classes, instance forwards, config values and the outputs on a batch."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import pytest
from lightning.pytorch.callbacks import Callback

import sharded_cases as cases
from lightning_sft.recipes.offload import CopyTransfer
from module_state import assert_same_state, module_state
from lightning_sft import (
    ActivationOffloading,
    AdaptiveRankSearch,
    AttentionImplementation,
    ContextualSparsity,
    GradientCheckpointing,
    LayerDropout,
    LoRA,
    SparseFineTuning,
)

# Callbacks that change the module in setup or at fit start, each configured to succeed.
CHANGERS: dict[str, Callable[[], list[Callback]]] = {
    "lora": lambda: [LoRA(r=2)],
    "qlora": lambda: [LoRA(r=2, quantize="nf4")],
    "sparsity": lambda: [LoRA(r=2), ContextualSparsity(mlp_sparsity=0.5, dense_layers=(), dense_warmup=1,
                                                       calibration_steps=0)],
    "layer_dropout": lambda: [LayerDropout(rate=0.5, protect_first=0, protect_last=0)],
    "sft": lambda: [SparseFineTuning(density=0.05, selection="weight")],
    "checkpointing": lambda: [GradientCheckpointing()],
    "attention": lambda: [AttentionImplementation("eager")],
    "offloading": lambda: [ActivationOffloading(min_bytes=0, transfer=CopyTransfer())],
}
# Callbacks that refuse this module or data, in setup or at fit start (after others changed the module).
REFUSERS: dict[str, Callable[[], Callback]] = {
    "layer_dropout": lambda: LayerDropout(rate=0.2, protect_first=2, protect_last=2),  # 2 blocks, 4 protected
    "checkpointing": lambda: GradientCheckpointing(blocks=["net.model.nope"]),
    "attention": lambda: AttentionImplementation("flash_attention_2"),  # no CUDA, no flash-attn
    "lora": lambda: LoRA(target_modules=["nope"]),
    "rank_search": lambda: AdaptiveRankSearch(candidates=(2, 4), trial_steps=1, val_batches=99),  # at fit start
    "sft": lambda: SparseFineTuning(density=0.05, score_batches=99),  # at fit start
    "sparsity": lambda: ContextualSparsity(mlp_sparsity="auto", dense_warmup=0),  # at fit start
}


def _pairs() -> list[tuple[str, str, bool]]:
    return [
        (changer, refuser, refuser_first)
        for changer in CHANGERS for refuser in REFUSERS for refuser_first in (False, True)
        # one class once per Trainer; sparse FT and LoRA refuse each other anyway (covered by "lora" x "sft")
        if changer != refuser and not (changer in ("lora", "qlora", "sparsity") and refuser == "lora")
    ]


@pytest.mark.parametrize(("changer", "refuser", "refuser_first"), _pairs(),
                         ids=lambda v: v if isinstance(v, str) else ("refuser first" if v else "refuser last"))
def test_a_refusal_leaves_the_module_as_it_was(changer: str, refuser: str, refuser_first: bool) -> None:
    if changer == "qlora":
        pytest.importorskip("bitsandbytes")
    module = cases.UserModule()
    before = module_state(copy.deepcopy(module))
    changing, refusing = CHANGERS[changer](), REFUSERS[refuser]()
    callbacks = [refusing, *changing] if refuser_first else [*changing, refusing]
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=2, callbacks=callbacks, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0)
    with pytest.raises((ValueError, RuntimeError, TypeError, ImportError)):
        trainer.fit(module, cases.loader(), cases.loader(8))
    assert_same_state(module_state(module), before)


def test_the_module_can_be_fitted_again_after_a_refusal() -> None:
    module = cases.UserModule()
    lora, dropout = LoRA(r=2), LayerDropout(rate=0.2, protect_first=2, protect_last=2)
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, callbacks=[lora, dropout], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match="LayerDropout"):
        trainer.fit(module, cases.loader())
    assert lora.adapted_modules == []  # the callbacks forgot the failed set-up too
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, callbacks=[lora], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, cases.loader())
    assert len(lora.adapted_modules) == 14 and trainer.global_step == 1


def test_a_failure_after_training_started_keeps_what_the_fit_made() -> None:
    class FailsAtStep2(Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
            if trainer.global_step == 1:
                raise RuntimeError("boom")

    module = cases.UserModule()
    trainer = pl.Trainer(accelerator="cpu", max_steps=3, callbacks=[LoRA(r=2), FailsAtStep2()], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(module, cases.loader())
    assert any(name.endswith("lora_B") for name, _ in module.named_parameters())  # trained adapters stay
