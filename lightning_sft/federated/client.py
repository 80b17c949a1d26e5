"""The Flower ClientApp: one round of local training is one Lightning ``Trainer.fit`` of the user's module.

Each round the client builds the user's LightningModule, injects the LoRA adapters its ``LoRA``
callback describes (seeded as the server seeded them, so every client starts from the same
adapters), loads the shared adapter tensors the server sent and, for every other adapter tensor,
its own copy from ``context.state`` (its personal layers), then fits ``local_steps`` steps with the
user's callbacks plus, optionally, ``LayerDropout(rate="auto", compute_budget=...)`` whose bandit is
carried from round to round in ``context.state``. It replies with exactly the tensors it received:
personal tensors never leave the client. A client that fails mid-round raises before it touches
its state, so Flower reports an error reply and the state is as it was.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from lightning.fabric.utilities.seed import seed_everything
from lightning.pytorch.callbacks import Callback

from lightning_sft.adapters.injection import inject_lora
from lightning_sft.adapters.peft_format import save_adapter
from lightning_sft.callbacks.layer_dropout import LayerDropout
from lightning_sft.callbacks.lora import LoRA
from lightning_sft.federated.sharing import adapter_groups, adapter_tensors
from lightning_sft.layer_dropout.schedules import check_budget

LOCAL_ADAPTERS = "local-adapters"  # context.state: this client's adapters after its last round
BANDIT_STATE = "layer-dropout"  # context.state: the LayerDropout state, as JSON
RUN_FRACTION = "run-fraction/"  # metric prefix: a block's fraction of training rows it ran on


@dataclass
class FederatedTask:
    """What every client runs: the user's module, its data and its callbacks, built afresh each round.

    Args:
        module: returns a fresh LightningModule (the same base model on every client).
        data: ``data(client, num_clients)`` returns the client's LightningDataModule (its own partition).
        callbacks: ``callbacks(client)`` returns the client's callbacks; exactly one ``LoRA`` among them.
        trainer: extra ``Trainer`` arguments (``max_steps`` is set by the federation).
        adapter_seed: seeds the adapters' initial values, identical on the server and every client.
    """

    module: Callable[[], pl.LightningModule]
    data: Callable[[int, int], pl.LightningDataModule]
    callbacks: Callable[[int], Sequence[Callback]]
    trainer: dict[str, Any] = field(default_factory=dict)
    adapter_seed: int = 0

    def lora(self, client: int) -> tuple[LoRA, list[Callback]]:
        callbacks = list(self.callbacks(client))
        loras = [cb for cb in callbacks if isinstance(cb, LoRA)]
        if len(loras) != 1:
            raise ValueError(
                f"A federated task needs exactly one LoRA callback (the adapters are what the clients exchange);"
                f" client {client}'s callbacks hold {len(loras)}."
            )
        if any(isinstance(cb, LayerDropout) for cb in callbacks):
            raise ValueError(
                "Pass layer dropout to the federation (layer_dropout='auto' or a rate), not as a client callback: it"
                " sizes each client's LayerDropout to its budget and carries the bandit across rounds."
            )
        return loras[0], callbacks

    def build(self, client: int) -> tuple[pl.LightningModule, list[Callback]]:
        """The module with its adapters injected (deterministically) and the client's callbacks."""
        lora, callbacks = self.lora(client)
        module = self.module()
        inject_lora(module, lora.config, torch.Generator().manual_seed(self.adapter_seed))
        return module, callbacks


def initial_adapters(task: FederatedTask) -> tuple[dict[str, torch.Tensor], dict[str, str], pl.LightningModule]:
    """The adapters every client starts from, their groups, and the module they came from (server side)."""
    module, _ = task.build(0)
    tensors = adapter_tensors(module)
    return tensors, adapter_groups(module, list(tensors)), module


@dataclass(frozen=True)
class ClientSettings:
    """How each client trains: local steps per round, layer dropout and its per-client compute budget.

    ``layer_dropout`` is ``None`` (off), a fixed rate, or ``"auto"`` (a bandit per client);
    ``budgets[client % len(budgets)]`` is that client's compute budget (the largest expected fraction
    of the blocks' compute a step may run; 1.0 is a full device).
    """

    local_steps: int
    layer_dropout: float | str | None = None
    budgets: tuple[float, ...] = (1.0,)
    decide_every: int = 10
    probe_batches: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.budgets:
            raise ValueError("`budgets` needs at least one value (1.0: a full device).")
        for budget in self.budgets:
            check_budget(budget)

    def budget(self, client: int) -> float:
        return self.budgets[client % len(self.budgets)]

    def layer_dropout_for(self, client: int) -> LayerDropout | None:
        """A fresh LayerDropout for ``client`` (None when off), sized to its budget."""
        if self.layer_dropout is None:
            return None
        return LayerDropout(
            rate=self.layer_dropout, compute_budget=self.budget(client), decide_every=self.decide_every,
            probe_batches=self.probe_batches, seed=self.seed + client,
        )

    def check_budgets(self, stack_sizes: Sequence[int], num_clients: int) -> None:
        """Refuse, before any client starts, a budget no allowed rate fits on this model."""
        for client in range(min(num_clients, len(self.budgets))):
            dropout = self.layer_dropout_for(client)
            if dropout is not None:
                try:
                    dropout.allowed_rates(stack_sizes)
                except ValueError as error:
                    raise ValueError(f"Client {client}: {error}") from None


def _load(module: pl.LightningModule, shared: dict[str, torch.Tensor], local: dict[str, torch.Tensor]) -> None:
    """Shared tensors from the server, the rest from the client's own copy (its initial values if none)."""
    parameters = dict(module.named_parameters())
    with torch.no_grad():
        for name, tensor in {**local, **shared}.items():
            if name not in parameters or parameters[name].shape != tensor.shape:
                raise ValueError(f"The server sent {name!r} with shape {tuple(tensor.shape)}, which this model lacks.")
            parameters[name].copy_(tensor)


def _state_tensors(context: Context) -> dict[str, torch.Tensor]:
    record = context.state.array_records.get(LOCAL_ADAPTERS)
    return dict(record.to_torch_state_dict()) if record is not None else {}


def _client_id(context: Context) -> tuple[int, int]:
    config = context.node_config
    return int(config.get("partition-id", 0)), int(config.get("num-partitions", 1))


def _trainer(task: FederatedTask, callbacks: list[Callback], max_steps: int, root: str) -> pl.Trainer:
    options: dict[str, Any] = dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=root,
    )
    options.update(task.trainer)
    options.update(max_steps=max_steps, callbacks=callbacks)
    return pl.Trainer(**options)


def _dataset_size(loader: Any, fallback: int) -> int:
    """The number of examples behind a dataloader, or ``fallback`` when its dataset has no length."""
    try:
        return len(loader.dataset)
    except (AttributeError, TypeError):
        return fallback


@dataclass
class _Round:
    """What a train or evaluate call starts from: the client, the tensors received, the personalised module."""

    client: int
    num_clients: int
    shared: dict[str, torch.Tensor]
    module: pl.LightningModule
    callbacks: list[Callback]
    data: pl.LightningDataModule


def _start(task: FederatedTask, message: Message, context: Context) -> _Round:
    """Build the module, load the shared tensors received and this client's own for the rest."""
    client, num_clients = _client_id(context)
    shared = dict(message.content.array_records["arrays"].to_torch_state_dict())
    module, callbacks = task.build(client)
    _load(module, shared, _state_tensors(context))
    return _Round(client, num_clients, shared, module, callbacks, task.data(client, num_clients))


def train_round(task: FederatedTask, settings: ClientSettings, message: Message, context: Context) -> Message:
    """One round of local training (the ClientApp's ``train``); see the module docstring."""
    start = _start(task, message, context)
    client, module, callbacks = start.client, start.module, start.callbacks
    round_ = int(message.content.config_records["config"].get("server-round", 1))
    dropout = settings.layer_dropout_for(client)
    if dropout is not None:
        saved = context.state.config_records.get(BANDIT_STATE)
        if saved is not None:
            dropout.continue_from(json.loads(str(saved["json"])))
        callbacks.append(dropout)
    seed_everything(settings.seed + 1000 * round_ + client, verbose=False)
    with tempfile.TemporaryDirectory() as root:
        trainer = _trainer(task, callbacks, settings.local_steps, root)
        began = time.perf_counter()
        trainer.fit(module, datamodule=start.data)
        seconds = time.perf_counter() - began
    trained = adapter_tensors(module)
    reply = {name: trained[name] for name in start.shared}  # exactly what was received: nothing personal
    loss = trainer.callback_metrics.get("train_loss")
    metrics: dict[str, float] = {
        "num-examples": _dataset_size(trainer.train_dataloader, trainer.global_step),
        "train-seconds": seconds,
        "steps": trainer.global_step,
        "client": client,
    }
    if loss is not None:
        metrics["train-loss"] = float(loss)
    if dropout is not None:
        metrics.update({f"{RUN_FRACTION}{block}": fraction for block, fraction in dropout.run_fractions.items()})
        metrics["drop-rate"] = float(dropout.current_rate(trainer.global_step))
        metrics["compute-budget"] = settings.budget(client)
    # Only now, after a successful round, is the client's state updated.
    context.state.array_records[LOCAL_ADAPTERS] = ArrayRecord(trained)
    if dropout is not None:
        context.state.config_records[BANDIT_STATE] = ConfigRecord({"json": json.dumps(dropout.state_dict())})
    return Message(RecordDict({"arrays": ArrayRecord(reply), "metrics": MetricRecord(metrics)}), reply_to=message)


def evaluate_round(task: FederatedTask, message: Message, context: Context) -> Message:
    """The personalised model (shared tensors from the server, personal ones from the state) on the
    client's own test split; replies with every scalar the module's ``test_step`` logged, and saves the
    personalised adapter when the server asks (``save-dir``)."""
    start = _start(task, message, context)
    with tempfile.TemporaryDirectory() as root:
        trainer = _trainer(task, start.callbacks, 0, root)
        results = trainer.test(start.module, datamodule=start.data, verbose=False)
    metrics: dict[str, float] = {key: float(value) for key, value in (results[0] if results else {}).items()}
    metrics["num-examples"] = _dataset_size(trainer.test_dataloaders, 1)
    metrics["client"] = start.client
    config = message.content.config_records.get("config")
    if config is not None and "save-dir" in config:  # this client's personalised adapter, in peft's format
        save_adapter(start.module, Path(str(config["save-dir"])) / f"client-{start.client}")
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=message)


def make_client_app(task: FederatedTask, settings: ClientSettings) -> ClientApp:
    """The Flower ClientApp running ``task``; deploy it with Flower's tools or simulate it with ``run_federated``."""
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        return train_round(task, settings, message, context)

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        return evaluate_round(task, message, context)

    return app
