"""The fit/validate/test options that switch a feature on in one flag (``--sparsity svd``), and the default callbacks.

A feature with a single switch registers a :class:`FeatureFlag` in :data:`FEATURE_FLAGS`; the
command line gains the option and the Trainer the callback it builds (see docs/cli.md).
"""

from __future__ import annotations

import argparse
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LightningArgumentParser

# Importing the callbacks registers them as Callback subclasses, so jsonargparse resolves the short
# names in `--trainer.callbacks+=LoRA` as well as full class paths.
from lightning_sft.callbacks import (
    ActivationOffloading,
    AdaptiveRankSearch,
    AttentionImplementation,
    ContextualSparsity,
    EfficiencyMonitor,
    EightBitOptimizer,
    FusedCrossEntropy,
    GradientCheckpointing,
    LayerDropout,
    LoRA,
    SparseFineTuning,
)
from lightning_sft.sparsity import available_strategies

# Callbacks on by default, configured by `--<key>.*` and switched off by `--no_<key>`.
DEFAULT_CALLBACKS: dict[str, type[Callback]] = {"lora": LoRA, "efficiency": EfficiencyMonitor}


@dataclass(frozen=True)
class FeatureFlag:
    """A top-level option (e.g. ``--sparsity STRATEGY``) that adds a callback when set to a non-default value.

    Args:
        name: the option, e.g. ``"--layer-dropout"``; its config-file key drops the leading dashes
            and reads other dashes as underscores (``layer_dropout``).
        help: shown by ``--help``.
        build: ``value -> Callback | None``, called only for non-default values; None adds nothing.
        type: the value's type; ignored when ``choices`` is given.
        choices: the allowed values, ``default`` among them.
        default: the value meaning "off".
    """

    name: str
    help: str
    build: Callable[[Any], Callback | None]
    type: Any = str
    choices: tuple[Any, ...] | None = None
    default: Any = None

    def __post_init__(self) -> None:
        if not self.name.startswith("--") or len(self.name) < 3:
            raise ValueError(f"A feature flag name looks like '--sparsity', got {self.name!r}.")
        if self.choices is not None and self.default not in self.choices:
            raise ValueError(f"{self.name}: the default {self.default!r} must be one of the choices {self.choices}.")

    @property
    def dest(self) -> str:
        return self.name[2:].replace("-", "_")

    def add_to(self, parser: LightningArgumentParser) -> None:
        value_type = Literal[self.choices] if self.choices is not None else self.type
        parser.add_argument(self.name, type=value_type, default=self.default, help=self.help)

    def callback(self, value: Any) -> Callback | None:
        return None if value == self.default else self.build(value)


def _rank_search(value: str) -> AdaptiveRankSearch | None:
    """``--rank-search``: ``off``, ``on`` (default candidates), ``per-module``, or candidate ranks ``4,8,16``."""
    if value == "off":
        return None
    if value in ("on", "per-module"):
        return AdaptiveRankSearch(per_module=value == "per-module")
    try:
        candidates = [int(part) for part in value.split(",")]
    except ValueError:
        raise ValueError(f"use off, on, per-module or comma-separated ranks such as 4,8,16; got {value!r}") from None
    return AdaptiveRankSearch(candidates=candidates)


def _layer_dropout(value: str) -> LayerDropout | None:
    """``--layer-dropout``: ``off``, ``auto`` (the bandit), or a rate in [0, 1)."""
    if value == "off":
        return None
    if value == "auto":
        return LayerDropout(rate="auto")
    return LayerDropout(rate=_number(value, "off, auto or a drop rate in [0, 1) such as 0.2"))


def _sft_density(value: str) -> SparseFineTuning | None:
    """``--sft-density``: ``off`` or the fraction of each weight's entries to train, such as 0.01."""
    if value == "off":
        return None
    return SparseFineTuning(density=_number(value, "off or a density in (0, 1] such as 0.01"))


def _number(value: str, usage: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"use {usage}; got {value!r}") from None


def _usage_error(build: Callable[[str], Callback | None]) -> Callable[[str], str]:
    """A parser type that builds the flag's callback once, so a bad value is a usage error, not a
    traceback at fit time."""

    def check(value: str) -> str:
        try:
            build(value)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
        return value

    return check


# Features switched on by one flag, keyed by flag name; each entry becomes an option of every subcommand.
FEATURE_FLAGS: dict[str, FeatureFlag] = {
    "--sparsity": FeatureFlag(
        "--sparsity",
        help="Contextual sparsity (SparseLoRA) channel strategy with default settings; 'off' disables it."
        " Tune it with --trainer.callbacks+=ContextualSparsity --trainer.callbacks.mlp_sparsity ... instead.",
        choices=("off", *available_strategies()),
        default="off",
        build=lambda strategy: ContextualSparsity(strategy=strategy),
    ),
    "--rank-search": FeatureFlag(
        "--rank-search",
        help="Choose the LoRA rank by short trials at fit start (AdaptiveRankSearch): 'on' tries ranks 2-32,"
        " 'per-module' also spreads the chosen rank's budget over the modules, '4,8,16' tries those ranks; 'off'"
        " disables it. Tune it with --trainer.callbacks+=AdaptiveRankSearch --trainer.callbacks.trial_steps ... instead.",
        type=_usage_error(_rank_search),
        default="off",
        build=_rank_search,
    ),
    "--layer-dropout": FeatureFlag(
        "--layer-dropout",
        help="Stochastic layer dropout (LayerDropout): a rate such as 0.2 skips that expected fraction of the blocks"
        " each training step; 'auto' lets a bandit choose the rate online; 'off' disables it. Tune it with"
        " --trainer.callbacks+=LayerDropout --trainer.callbacks.schedule ... instead.",
        type=_usage_error(_layer_dropout),
        default="off",
        build=_layer_dropout,
    ),
    "--sft-density": FeatureFlag(
        "--sft-density",
        help="Sparse fine-tuning (SparseFineTuning) instead of LoRA: train this fraction of each linear weight's"
        " entries (Fisher-selected), e.g. 0.01, and save diff.safetensors after the fit; 'off' disables it. Tune it"
        " with --trainer.callbacks+=SparseFineTuning --trainer.callbacks.selection ... instead.",
        type=_usage_error(_sft_density),
        default="off",
        build=_sft_density,
    ),
    "--gradient-checkpointing": FeatureFlag(
        "--gradient-checkpointing",
        help="Activation checkpointing per block (GradientCheckpointing): keep one input per block and recompute"
        " each block in the backward pass, for about one more forward of compute; 'off' disables it.",
        choices=("off", "on"),
        default="off",
        build=lambda value: GradientCheckpointing(),
    ),
    "--fused-ce": FeatureFlag(
        "--fused-ce",
        help="Fused linear cross-entropy (FusedCrossEntropy): the causal LM's training loss from its hidden states"
        " and head, chunk by chunk, never holding the tokens x vocab logits or their gradient; 'off' disables it.",
        choices=("off", "on"),
        default="off",
        build=lambda value: FusedCrossEntropy(),
    ),
    "--offload-activations": FeatureFlag(
        "--offload-activations",
        help="Activation offloading (ActivationOffloading, CUDA): what each block saves for backward waits in pinned"
        " host memory, copied on a side stream; composes with --gradient-checkpointing; 'off' disables it.",
        choices=("off", "on"),
        default="off",
        build=lambda value: ActivationOffloading(),
    ),
    "--attention": FeatureFlag(
        "--attention",
        help="Attention kernel of the Hugging Face model (AttentionImplementation): 'sdpa' keeps no seq x seq"
        " attention matrix for the backward pass, 'flash_attention_2' needs a CUDA GPU and flash-attn; 'default'"
        " leaves the model's own.",
        choices=("default", "eager", "sdpa", "flash_attention_2"),
        default="default",
        build=AttentionImplementation,
    ),
    "--optimizer-8bit": FeatureFlag(
        "--optimizer-8bit",
        help="8-bit optimizer states (EightBitOptimizer, bitsandbytes): Adam/AdamW/SGD-momentum keep about 2 bytes"
        " per trained parameter instead of 8; 'off' disables it.",
        choices=("off", "on"),
        default="off",
        build=lambda value: EightBitOptimizer(),
    ),
}


def flag_summary() -> str:
    names = [f"--{key}.{param}" for key, cls in DEFAULT_CALLBACKS.items() for param in _init_params(cls)]
    names += [f"--no_{key}" for key in DEFAULT_CALLBACKS]
    names += list(FEATURE_FLAGS)
    return ", ".join(names)


def _init_params(cls: type) -> list[str]:
    return [name for name in inspect.signature(cls.__init__).parameters if name != "self"]
