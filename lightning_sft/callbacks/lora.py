"""The LoRA callback: adapters injected into any LightningModule before its optimizer exists."""

from __future__ import annotations

from collections.abc import Sequence
from types import MappingProxyType
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_sft.adapters.checkpoint import CHECKPOINT_KEY, structure_record
from lightning_sft.adapters.injection import LoRAConfig, inject_lora, lora_layers
from lightning_sft.anatomy.modules import replace_submodule
from lightning_sft.adapters.lora_layer import LoRALinear
from lightning_sft.adapters.quantization import (
    check_quant_type,
    check_quantizable,
    quantize_base,
    quantized_bytes,
    quantized_layers,
)
from lightning_sft.callbacks.base import SFTCallback
from lightning_sft.sparse_ft.delta_layer import sparse_delta_layers
from lightning_sft.strategies import DEEPSPEED, FSDP, strategy_kind



_NO_4BIT_DELTAS = "sparse fine-tuning trains entries of the base weights, which 4-bit storage cannot hold. Use one of the two."


class LoRA(SFTCallback):
    """Inject LoRA adapters into the LightningModule's layers and freeze everything else.

    Injection happens in ``setup``, before Lightning calls ``configure_optimizers``, so an
    optimizer built from ``self.parameters()`` sees the adapters and frozen weights get no state.

    Args:
        r: adapter rank.
        alpha: scaling numerator; the update is scaled by ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA).
        dropout: dropout on the adapter input, in [0, 1).
        target_modules: ``"all-linear"`` (every linear layer except output heads), a list of
            module-name suffixes such as ``["q_proj", "v_proj"]``, or a regex matched against full names.
        exclude_modules: the same forms, removed from the selection.
        use_rslora: scale by ``alpha / sqrt(r)`` (rank-stabilised LoRA).
        rank_pattern: per-module ranks, keyed by module name or name suffix.
        alpha_pattern: per-module alphas, keyed like ``rank_pattern``.
        quantize: ``"nf4"`` or ``"fp4"`` stores every frozen linear layer except output heads in 4 bits
            (QLoRA, bitsandbytes >= 0.50, CPU or CUDA) after the adapters are injected; ``None`` keeps the
            base as it is. See docs/lora.md, "QLoRA: 4-bit base".

    Runs on one device and under DDP, FSDP2 (``strategy="fsdp2"``), FSDP and DeepSpeed: the adapters are
    injected before the strategy shards the module, so they are sharded with it (docs/distributed.md).
    """

    excludes_when = MappingProxyType({"SparseFineTuning": ("quantize", _NO_4BIT_DELTAS)})

    def __init__(
        self,
        r: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        target_modules: str | Sequence[str] = "all-linear",
        exclude_modules: str | Sequence[str] | None = None,
        use_rslora: bool = False,
        rank_pattern: dict[str, int] | None = None,
        alpha_pattern: dict[str, float] | None = None,
        quantize: str | None = None,
    ) -> None:
        self.quantize = None if quantize is None else check_quant_type(quantize, "quantize")
        self.config = LoRAConfig(
            r=r,
            alpha=alpha,
            dropout=dropout,
            target_modules=target_modules,
            exclude_modules=exclude_modules,
            use_rslora=use_rslora,
            rank_pattern=dict(rank_pattern or {}),
            alpha_pattern=dict(alpha_pattern or {}),
        )
        self.adapted_modules: list[str] = []
        # The seed this callback drew the module's adapters from (None if it has others), so that
        # AdaptiveRankSearch can rebuild them as a run at another rank would have drawn them.
        self.init_seed: int | None = None
        self._injected_into: int | None = None
        self._hooked: set[int] = set()

    def run_label(self) -> str:
        return f"LoRA r={self.config.r}"

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.begin_setup(trainer, pl_module, stage)
        if self.quantize is not None:
            self._check_quantizable(trainer, pl_module)
        existing = lora_layers(pl_module)
        if existing:
            # A second fit with the same module, or adapters loaded with `load_adapter`: keep them.
            self.adapted_modules = list(existing)
            if id(pl_module) != self._injected_into:
                self.init_seed = None
        else:
            # The adapters come from a generator seeded by one draw of the global RNG, so what the run
            # draws afterwards (data order, dropout) is the same whatever their ranks.
            self.init_seed, self._injected_into = int(torch.randint(2**62, ()).item()), id(pl_module)
            generator = torch.Generator().manual_seed(self.init_seed)
            self.adapted_modules = inject_lora(pl_module, self.config, generator)
            trainable = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
            total = sum(p.numel() for p in pl_module.parameters())
            rank_zero_info(
                f"LoRA: adapted {len(self.adapted_modules)} layers; trainable parameters {trainable:,} of {total:,}"
                f" ({100 * trainable / total:.2f}%)."
            )
        if self.quantize is not None and not quantized_layers(pl_module):
            self._quantize(pl_module)
        if id(pl_module) not in self._hooked:
            pl_module.register_load_state_dict_pre_hook(self._match_checkpoint_ranks)
            self._hooked.add(id(pl_module))

    def conflict_with(self, other: SFTCallback) -> str | None:
        if self.quantize is not None and type(other).__name__ in self.excludes_when:
            return f"quantize={self.quantize!r}: {self.excludes_when[type(other).__name__][1]}"
        return super().conflict_with(other)

    def _check_quantizable(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Refuse, before any change, what a 4-bit base cannot go with (the callbacks: ``conflict_with``)."""
        if sparse_delta_layers(pl_module):
            raise ValueError(f"LoRA(quantize={self.quantize!r}): the module holds sparse deltas; {_NO_4BIT_DELTAS}")
        kind = strategy_kind(trainer.strategy)
        if kind in (FSDP, DEEPSPEED):
            raise RuntimeError(
                f"LoRA(quantize={self.quantize!r}) does not run under {kind}: it flattens (FSDP) or partitions (ZeRO)"
                " each unit's weights into one buffer of one dtype, and bitsandbytes' 4-bit weights are uint8 with"
                " their quantization state beside them. Use strategy='fsdp2', which shards each weight on its own,"
                " or 'ddp'."
            )
        if not quantized_layers(pl_module):
            check_quantizable(pl_module, self.quantize)

    def _quantize(self, pl_module: pl.LightningModule) -> None:
        """Quantize after injection: the base is frozen, the optimizer does not exist yet, and Lightning has
        not moved the module (bitsandbytes moves a quantized layer to CUDA itself)."""
        dense = {
            name: module.weight.numel() * module.weight.element_size()
            for name, module in pl_module.named_modules()
            if isinstance(module, torch.nn.Linear)
        }
        names = quantize_base(pl_module, self.quantize)
        layers = quantized_layers(pl_module)
        before, after = sum(dense[name] for name in names), sum(quantized_bytes(layers[name]) for name in names)
        rank_zero_info(
            f"LoRA: {len(names)} base layers stored in {self.quantize} (QLoRA): weights {before / 2**20:.1f} MiB ->"
            f" {after / 2**20:.1f} MiB."
        )

    def _match_checkpoint_ranks(self, module: torch.nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
        """On resume, rebuild adapters whose rank or alpha in the checkpoint differs: the checkpoint wins
        (its alpha as recorded, since a rank search scales alpha with the rank; else the configured one)."""
        saved_4bit = any(key.endswith(".weight.quant_map") for key in state_dict)
        if saved_4bit != bool(quantized_layers(module)):
            ckpt, here = ("a 4-bit", "a dense") if saved_4bit else ("a dense", "a 4-bit")
            raise ValueError(
                f"The checkpoint holds {ckpt} base and this run has {here} one: resume with the LoRA(quantize=...)"
                " setting of the run that wrote it."
            )
        recorded = _loaded_structure(module)
        changed = []
        for name, layer in lora_layers(module).items():
            saved = state_dict.get(f"{prefix}{name}.lora_A")
            if saved is None:
                continue
            rank, alpha = saved.shape[0], float(recorded.get(name, {}).get("alpha", layer.alpha))
            if rank != layer.r or alpha != layer.alpha:
                changed.append(
                    f"{name}: rank {rank} in the checkpoint, alpha {alpha:g} (configured {layer.r}, {layer.alpha:g})"
                )
                resized = LoRALinear(layer.base_layer, rank, alpha, layer.dropout_p, layer.use_rslora)
                replace_submodule(module, name, resized)
        if changed:
            rank_zero_warn(
                f"LoRA: {len(changed)} adapters take their rank and alpha from the checkpoint, e.g. {changed[0]}."
            )

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = structure_record(pl_module)


def _loaded_structure(module: torch.nn.Module) -> dict[str, Any]:
    """The adapter structure recorded in the checkpoint the module's Trainer is loading, or {}.

    Lightning hands callbacks the checkpoint only after the module's weights are loaded, so this
    reads the Trainer's loaded checkpoint (a private attribute; {} if it is not there).
    """
    trainer = getattr(module, "_trainer", None)
    loaded = getattr(getattr(trainer, "_checkpoint_connector", None), "_loaded_checkpoint", None) or {}
    return dict((loaded.get(CHECKPOINT_KEY) or {}).get("structure", {}))
