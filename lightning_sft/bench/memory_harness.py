"""Measuring the memory of one real Lightning training step, component by component.

The step runs in a ``Trainer`` with this package's callbacks, on a random-init model built from a
transformers config (no download). ``LiveTensors`` counts every tensor storage alive during the
step; the storages alive at its peak are then sorted into the estimator's components:

- weights: parameters, buffers and 4-bit quantization state; optimizer: optimizer state;
  gradients: ``.grad`` tensors;
- activations and logits: what the autograd graph still holds when the forward pass ends
  (saved tensors, and block inputs kept by checkpointing), split by width: logits are vocab-wide;
- temporaries: everything else alive at the peak.

``saved_bytes`` (through ``saved_tensors_hooks``) cross-checks the activations without checkpointing.
With activation offloading the CPU has no second memory to move to: the offloader copies within CPU memory
(``CopyTransfer``) and the tracker counts those copies as host memory (``host_peak``), apart from the rest.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, Dataset

from lightning_sft.memory.estimate import COMPONENTS
from lightning_sft.memory.setup import TrainingSetup
from lightning_sft.memory.shapes import hf_config, model_shape
from lightning_sft.memory.tracker import HostCopies, LiveTensors, SavedForBackward, storage_key

_MEASURED_STEP = 1  # the second step: optimizer state exists, as in every step after the first


@dataclass
class Measurement:
    """Bytes per component at the step's peak, the full gradient size, and where the peak fell."""

    components: dict[str, int]
    peak: int
    phase: str
    gradients_total: int
    activations_total: int
    logits_total: int
    saved_bytes: int
    host_peak: int


class _RandomTokens(Dataset):
    def __init__(self, vocab: int, batch: int, seq: int, steps: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(vocab, (steps * batch, seq), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.ids[index]


class _LanguageModel(pl.LightningModule):
    def __init__(self, model: torch.nn.Module, optimizer: str, lr: float = 1e-3) -> None:
        super().__init__()
        self.model = model
        self.optimizer_name = optimizer
        self.lr = lr

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.model(input_ids=batch, labels=batch).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=0.9)
        return torch.optim.AdamW(params, lr=self.lr)


def _quant_state_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    """The scales and code tables of 4-bit weights (bitsandbytes keeps them beside the parameter)."""
    tensors = []
    for layer in module.modules():
        state = getattr(getattr(layer, "weight", None), "quant_state", None)
        if state is None:
            continue
        tensors += [state.absmax, state.code]
        if getattr(state, "nested", False):
            tensors += [state.offset, state.state2.absmax, state.state2.code]
    return [t for t in tensors if isinstance(t, torch.Tensor)]


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


class _StepProbe(Callback):
    """Tracks the measured step from batch start to batch end. Lightning zeroes the gradients after
    the forward pass (``on_before_backward`` comes after it), so the previous step's gradients are
    live during the forward."""

    def __init__(self, vocab: int) -> None:
        self.vocab = vocab
        self.tracker: LiveTensors | None = None
        self.host_copies = HostCopies()  # offloading's copies: host memory while the measured step is tracked
        self.saved: SavedForBackward | None = None
        self.result: Measurement | None = None

    def _serials(self, tensors: Any) -> set[int]:
        assert self.tracker is not None
        return {s for s in (self.tracker.serial(t) for t in tensors) if s is not None}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if batch_idx != _MEASURED_STEP:
            return
        gc.collect()
        weights = [*pl_module.parameters(), *pl_module.buffers(), *_quant_state_tensors(pl_module)]
        states = [t for opt in trainer.optimizers for t in _optimizer_tensors(opt)]
        tracker = self.tracker = self.host_copies.tracker = LiveTensors()
        tracker.register([*weights, *states, batch])
        tracker.register(p.grad for p in pl_module.parameters() if p.grad is not None)
        self.weight_serials = self._serials(weights)
        self.state_serials = self._serials(states)
        self.start_serials = set(tracker.snapshot())
        tracker.peak_probe = lambda: self._serials(p.grad for p in pl_module.parameters() if p.grad is not None)
        tracker.peak_extra = tracker.peak_probe()
        self.peak_before: dict[str, int] = {}
        self.saved = SavedForBackward(storage_key(t) for t in weights).__enter__()
        tracker.__enter__()

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        if self.tracker is not None:
            self.retained = {k: v for k, v in self.tracker.snapshot().items() if k not in self.start_serials}
            self.peak_before["backward"] = self.tracker.peak

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self.tracker is not None:
            grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
            self.gradients_total = sum(g.untyped_storage().nbytes() for g in grads)
            self.peak_before["optimizer"] = self.tracker.peak

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.tracker is None or self.saved is None:
            return
        tracker, saved = self.tracker, self.saved
        tracker.__exit__(None, None, None)
        saved.__exit__(None, None, None)
        self.tracker = self.saved = self.host_copies.tracker = None
        self.result = self._sort(tracker, saved)

    def _sort(self, tracker: LiveTensors, saved: SavedForBackward) -> Measurement:
        grads = tracker.peak_extra or set()
        components = dict.fromkeys(COMPONENTS, 0)
        for serial, info in tracker.at_peak.items():
            if serial in self.weight_serials:
                part = "weights"
            elif serial in self.state_serials:
                part = "optimizer"
            elif serial in grads:
                part = "gradients"
            elif serial in self.retained:
                part = "logits" if info.last_dim == self.vocab else "activations"
            else:
                part = "temporaries"
            components[part] += info.nbytes
        if tracker.peak <= self.peak_before["backward"]:
            phase = "forward"
        elif tracker.peak <= self.peak_before["optimizer"]:
            phase = "backward"
        else:
            phase = "optimizer"
        retained = self.retained.values()
        return Measurement(
            components=components,
            peak=tracker.peak,
            phase=phase,
            gradients_total=self.gradients_total,
            activations_total=sum(s.nbytes for s in retained if s.last_dim != self.vocab),
            logits_total=sum(s.nbytes for s in retained if s.last_dim == self.vocab),
            saved_bytes=saved.total(),
            host_peak=tracker.host_peak,
        )


def _callbacks(setup: TrainingSetup, host_copies: HostCopies) -> list[Callback]:
    """This package's callbacks that give ``setup`` its method and recipes, as a user would add them."""
    from lightning_sft.callbacks import LoRA, SparseFineTuning

    callbacks: list[Callback] = []
    if setup.method in ("lora", "qlora"):
        quantize = {"quantize": "nf4"} if setup.method == "qlora" else {}
        callbacks.append(LoRA(r=setup.lora_r, alpha=2.0 * setup.lora_r, **quantize))
    elif setup.method == "sft":
        callbacks.append(SparseFineTuning(density=setup.sft_density, selection="random"))
    if setup.gradient_checkpointing:
        from lightning_sft.callbacks import GradientCheckpointing

        callbacks.append(GradientCheckpointing())
    if setup.optimizer == "adamw8bit":
        from lightning_sft.callbacks import EightBitOptimizer

        callbacks.append(EightBitOptimizer())
    if setup.fused_ce:
        from lightning_sft.callbacks import FusedCrossEntropy

        callbacks.append(FusedCrossEntropy())
    if setup.layer_dropout:
        from lightning_sft.callbacks import LayerDropout

        callbacks.append(LayerDropout(rate=setup.layer_dropout))
    if setup.offload_activations:
        from lightning_sft.callbacks import ActivationOffloading

        callbacks.append(ActivationOffloading(min_bytes=setup.offload_min_bytes, transfer=host_copies))
    return callbacks


def measure(config: Any, setup: TrainingSetup, seed: int = 0) -> Measurement:
    """Memory of the second training step of ``setup`` on a random-init model of ``config``, on CPU."""
    from transformers import AutoModelForCausalLM

    cfg = hf_config(config)
    shape = model_shape(cfg)
    pl.seed_everything(seed, verbose=False)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=setup.attention).train()
    module = _LanguageModel(model, "sgd" if setup.optimizer == "sgd" else "adamw")
    probe = _StepProbe(shape.vocab)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        precision=setup.precision,
        max_steps=_MEASURED_STEP + 1,
        callbacks=[*_callbacks(setup, probe.host_copies), probe],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    data = DataLoader(_RandomTokens(shape.vocab, setup.batch, setup.seq, _MEASURED_STEP + 1, seed), batch_size=setup.batch)
    trainer.fit(module, train_dataloaders=data)
    if probe.result is None:  # pragma: no cover - the fit always reaches the measured step
        raise RuntimeError("The measured step did not run.")
    return probe.result
