"""Running the module outside Lightning's loops: the rank-search trials and the layer-dropout probe.

Both read batches as the fit loop would (distributed samplers under DDP), compute the loss with the
module's own ``training_step``, and must leave no trace in the fit: ``self.log`` is silenced (its
metrics are not the fit's, and outside a loop it would raise) and every module's train/eval mode is
put back.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.connectors.data_connector import _process_dataloader, _request_dataloader
from lightning.fabric.utilities.data import sized_len
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from lightning.pytorch.utilities import CombinedLoader, rank_zero_warn


def fit_dataloader(trainer: pl.Trainer, source: Any, stage: RunningStage, who: str, why: str) -> CombinedLoader:
    """The source's dataloader(s) processed as the fit loop does; several train loaders are zipped
    (the fit's ``max_size_cycle``), several val loaders read one after another."""
    if not source.is_defined():
        raise ValueError(
            f"{who} needs a {stage.dataloader_prefix}_dataloader ({why}); define it in the LightningModule or"
            " DataModule, or pass it to fit()."
        )
    mode = "max_size_cycle" if stage == RunningStage.TRAINING else "sequential"
    combined = CombinedLoader(_request_dataloader(source), mode)
    combined.flattened = [_process_dataloader(trainer, TrainerFn.FITTING, stage, dl) for dl in combined.flattened]
    return combined


def batch_limit(trainer: pl.Trainer, stage: RunningStage) -> tuple[str, int | float]:
    """The Trainer's ``limit_train_batches`` or ``limit_val_batches`` for ``stage``: its name and value."""
    if stage == RunningStage.TRAINING:
        return "limit_train_batches", trainer.limit_train_batches
    return "limit_val_batches", trainer.limit_val_batches


def usable_batches(trainer: pl.Trainer, loader: CombinedLoader, stage: RunningStage) -> int | None:
    """Batches one pass of ``loader`` gives within the Trainer's ``limit_train_batches`` /
    ``limit_val_batches`` (an int caps the count, a float takes that fraction); None if not sized.
    A limit of 0 turns Lightning's own loop off, not the data, so it bounds nothing here."""
    lengths = [sized_len(dl) for dl in loader.flattened]
    if None in lengths:
        return None
    total = max(lengths) if stage == RunningStage.TRAINING else sum(lengths)
    _, limit = batch_limit(trainer, stage)
    if not limit:
        return total
    return min(total, limit) if isinstance(limit, int) else int(total * limit)


def batch_count(name: str, requested: int | None, default: int, available: int | None, who: str, what: str) -> int:
    """How many batches a side loop reads: ``requested`` if the data (within the limits) meets it, else an
    error; unset (None), ``default`` or what the data offers if that is less, said once on rank zero."""
    if requested is not None:
        if available is not None and requested > available:
            raise ValueError(
                f"{who}: `{name}={requested}` needs {requested} {what} batches, but the {what} data gives {available}"
                f" (within limit_*_batches). Lower {name}, or leave it unset to use what there is."
            )
        return requested
    if available is None or available >= default:
        return default
    if available < 1:
        raise ValueError(f"{who} needs {what} batches, and the {what} data (within limit_*_batches) has none.")
    rank_zero_warn(
        f"{who}: the {what} data gives {available} batches (within limit_*_batches), fewer than the default"
        f" {name}={default}; using {name}={available}. Set {name} to choose."
    )
    return available


def take_batches(loader: CombinedLoader, count: int, what: str, who: str, fix: str) -> Iterator[tuple[int, Any]]:
    """``count`` batches from a fresh iterator, with their index; ``fix`` says what to lower if they run out."""
    iterator = iter(loader)
    for index in range(count):
        try:
            batch, _, _ = next(iterator)
        except StopIteration:
            raise ValueError(
                f"{who}: the {what} data ran out after {index} batches; {count} are needed. Lower {fix} or use more data."
            ) from None
        yield index, batch


def step_loss(
    trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, index: int, context: Any, who: str
) -> torch.Tensor:
    """The loss ``training_step`` returns for ``batch`` (moved to the device), under ``context``."""
    batch = trainer.strategy.batch_to_device(batch)
    with context():
        output = pl_module.training_step(batch, index)
    loss = output.get("loss") if isinstance(output, Mapping) else output
    if not isinstance(loss, torch.Tensor):
        raise RuntimeError(
            f"{who} needs training_step to return the loss (a tensor, or a dict with 'loss');"
            f" it returned {type(output).__name__}."
        )
    return loss


def restore_modes(pl_module: pl.LightningModule, modes: dict[str, bool]) -> None:
    for name, module in pl_module.named_modules():
        if name in modes:
            module.training = modes[name]


def _ignore(*_: Any, **__: Any) -> None:
    """``self.log`` outside the fit's loops: those metrics are not the fit's."""


@contextmanager
def outside_the_fit(pl_module: pl.LightningModule) -> Iterator[dict[str, bool]]:
    """Silence ``log``/``log_dict`` and give back every module's train/eval mode afterwards; yields the modes."""
    modes = {name: module.training for name, module in pl_module.named_modules()}
    own = {key: pl_module.__dict__[key] for key in ("log", "log_dict") if key in pl_module.__dict__}
    pl_module.log = pl_module.log_dict = _ignore
    try:
        yield modes
    finally:
        for key in ("log", "log_dict"):
            if key in own:
                setattr(pl_module, key, own[key])
            else:
                delattr(pl_module, key)
        restore_modes(pl_module, modes)


def check_batches(
    trainer: pl.Trainer, loader: CombinedLoader, needed: int, what: str, setting: str, fix: str, who: str
) -> None:
    """Refuse, before anything runs, a side loop that needs more ``what`` batches than the data has."""
    stage = RunningStage.TRAINING if what == "training" else RunningStage.VALIDATING
    available = usable_batches(trainer, loader, stage)
    if available is None:
        return  # not sized: take_batches reports it if the data runs out
    if needed > available:
        where = f" on each of {trainer.world_size} processes" if trainer.world_size > 1 else ""
        name, limit = batch_limit(trainer, stage)
        limited = f" (within {name}={limit})" if isinstance(limit, int) or limit < 1.0 else ""
        raise ValueError(
            f"{who}: a trial needs {needed} {what} batches ({setting}), but the {what} data has"
            f" {available}{where}{limited}. Lower {fix}, leave it unset to use what there is, or use more data."
        )


def mean_gradients(trainer: pl.Trainer, params: list[torch.nn.Parameter]) -> None:
    """Average gradients over processes as DDP would (the trials call the module, not the DDP
    wrapper); one all-reduce of all of them."""
    if trainer.world_size == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = trainer.strategy.reduce(torch.cat([g.reshape(-1) for g in grads]), reduce_op="mean")
    for param, piece in zip(params, flat.split([g.numel() for g in grads])):
        param.grad = piece.view_as(param).to(param.dtype)
