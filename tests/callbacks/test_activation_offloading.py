"""The ActivationOffloading callback in CPU fits (through CopyTransfer): the same training as without it, with
checkpointing and layer dropout in any order, forwards restored at teardown, the host bytes logged, and
the refusal of a CPU fit with the default (CUDA) transfer."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lightning_sft import ActivationOffloading, GradientCheckpointing, LayerDropout, LoRA
from lightning_sft.cli.flags import FEATURE_FLAGS
from lightning_sft.recipes.offload import CopyTransfer
from tiny_fits import tiny_fit

pytestmark = pytest.mark.usefixtures("one_thread")


class _Logged(pl.Callback):
    def __init__(self) -> None:
        self.host: list[float] = []
        self.moved: list[float] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: object) -> None:
        self.host.append(float(trainer.callback_metrics["offload/host_gib"]))
        self.moved.append(float(trainer.callback_metrics["offload/moved_gib"]) * 2**30)


def _trained(module: pl.LightningModule) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters() if p.requires_grad}


def _lora_and_dropout() -> list[pl.Callback]:
    return [LoRA(r=4, dropout=0.1), LayerDropout(rate=0.5, protect_first=0, protect_last=0, per_sample=True)]


@pytest.mark.parametrize("order", [1, -1])
def test_offloading_trains_as_without_it_with_checkpointing_and_layer_dropout(tmp_path: Path, order: int) -> None:
    plain = _trained(tiny_fit(tmp_path / "a", 3, [*_lora_and_dropout(), GradientCheckpointing()]))
    offloading, logged = ActivationOffloading(min_bytes=0, transfer=CopyTransfer()), _Logged()
    callbacks = [offloading, GradientCheckpointing(), *_lora_and_dropout()][::order]
    module = tiny_fit(tmp_path / "b", 3, [*callbacks, logged])
    got = _trained(module)
    assert got.keys() == plain.keys() and got
    for name in got:
        torch.testing.assert_close(got[name], plain[name], rtol=0, atol=0, msg=name)
    assert all("forward" not in vars(block) for block in module.model.model.layers)  # teardown restored them
    assert offloading.forward_wrappers() == []
    assert len(logged.host) == 3 and all(gib > 0 for gib in logged.host)


@pytest.mark.parametrize("order", [1, -1])
def test_with_checkpointing_in_either_order_the_block_inputs_are_what_moves(tmp_path: Path, order: int) -> None:
    logged = _Logged()
    callbacks = [ActivationOffloading(min_bytes=0, transfer=CopyTransfer()), GradientCheckpointing()][::order]
    module = tiny_fit(tmp_path, 2, [LoRA(r=4), *callbacks, logged])
    config = module.model.config
    block_input = 4 * 16 * config.hidden_size * 4  # batch 4 x 16 tokens, fp32
    assert logged.moved == [config.num_hidden_layers * block_input] * 2


def test_offloading_alone_trains_as_without_it(tmp_path: Path) -> None:
    plain = _trained(tiny_fit(tmp_path / "a", 3, [LoRA(r=4)]))
    module = tiny_fit(tmp_path / "b", 3, [LoRA(r=4), ActivationOffloading(min_bytes=0, transfer=CopyTransfer())])
    got = _trained(module)
    assert got.keys() == plain.keys() and got
    for name in got:
        torch.testing.assert_close(got[name], plain[name], rtol=0, atol=0, msg=name)


def test_a_cpu_fit_with_the_default_transfer_is_refused_with_the_reason(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="computes on cpu.*nothing to gain.*--offload-activations off"):
        tiny_fit(tmp_path, 1, [LoRA(r=4), ActivationOffloading()])


def test_the_flag_adds_the_callback() -> None:
    flag = FEATURE_FLAGS["--offload-activations"]
    assert flag.default == "off" and isinstance(flag.build("on"), ActivationOffloading)
