"""``lightning-sft``: Lightning's CLI with this package's callbacks as first-class flags.

``lightning-sft fit`` runs the main job from ``configs/demo.yaml`` (LoRA fine-tuning of the shipped base
on the embedded task); every key can be overridden by a flag, and ``--model`` / ``--data`` take other
classes. ``bench``, ``pretrain`` and ``report`` are plain subcommands. See ``docs/cli.md``.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NoReturn

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_helpers import is_overridden

# Importing the callbacks registers them as Callback subclasses, so jsonargparse resolves the short
# names in `--trainer.callbacks+=LoRA` as well as full class paths.
from lightning_sft.adapters import lora_layers, save_adapter
from lightning_sft.callbacks import (
    AdaptiveRankSearch,
    AttentionImplementation,
    ContextualSparsity,
    EfficiencyMonitor,
    EightBitOptimizer,
    GradientCheckpointing,
    LayerDropout,
    LoRA,
    SparseFineTuning,
)
from lightning_sft.sparse_ft import save_diff, sparse_delta_layers
from lightning_sft.sparsity import available_strategies
from lightning_sft.summary import format_summary, run_summary
from lightning_sft.usage import debugging, exit_with_usage_error, usage_errors

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "demo.yaml"
@dataclass(frozen=True)
class Command:
    """One ``lightning-sft`` subcommand: ``module`` provides ``main(argv) -> int`` and is imported only when
    the command runs (None: one of LightningCLI's own); ``usage`` and ``does`` are what --help and
    docs/cli.md show."""

    name: str
    module: str | None
    usage: str
    does: str


# Every subcommand, in the order --help and docs/cli.md list them: the one registry of the command line.
COMMANDS: tuple[Command, ...] = (
    Command("fit", None, "fit ...", "`Trainer.fit`, then saves the LoRA adapter or the sparse diff and tests again"),
    Command("validate", None, "validate ...", "`Trainer.validate` (one pass over the validation split)"),
    Command("test", None, "test ...", "`Trainer.test` (one pass over the test split)"),
    Command("bench", "lightning_sft.bench", "bench BENCHMARK ...",
            "micro-benchmarks, `lightning_sft.bench`; `lightning-sft bench --help` lists them"),
    Command("diff", "lightning_sft.diff_cli", "diff inspect|apply|revert DIFF ...",
            "what a sparse diff holds (`inspect`), or a model directory with it added (`apply`) or taken out (`revert`)"
            " written to a new directory ([sparse_finetuning.md](sparse_finetuning.md))"),
    Command("federated", "lightning_sft.federated.cli", "federated [--clients 4] [--rounds 5] ...",
            "a Flower simulation of federated LoRA on a non-IID split of the embedded task ([federated.md](federated.md))"),
    Command("plan", "lightning_sft.memory.plan_cli", "plan --model CONFIG_OR_PRESET --gpu-mem 24GB ...",
            "the fine-tuning recipes that fit a GPU budget, and the recommended one as a `fit` command"
            " ([memory.md](memory.md), [distributed.md](distributed.md))"),
    Command("pretrain", "lightning_sft.pretraining.run", "pretrain --out DIR ...",
            "reproduce the shipped base model ([base_model.md](base_model.md))"),
    Command("report", "lightning_sft.report", "report LOGDIR [LOGDIR ...] [--out DIR]",
            "loss, accuracy and efficiency curves of the runs under the directories, in `report.png` + `report.html`"),
)
PLAIN_SUBCOMMANDS = {command.name: command.module for command in COMMANDS if command.module is not None}


def command_table() -> str:
    """The command list of docs/cli.md, from ``COMMANDS``."""
    rows = [f"| `lightning-sft {c.usage.replace('|', chr(92) + '|')}` | {c.does} |" for c in COMMANDS]
    return "\n".join(["| command | what it does |", "| --- | --- |", *rows])


def _commands_epilog() -> str:
    return "Commands: " + "; ".join(f"{c.name}: {c.does.split(' ([')[0]}" for c in COMMANDS) + "."



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


def _flag_summary() -> str:
    names = [f"--{key}.{param}" for key, cls in DEFAULT_CALLBACKS.items() for param in _init_params(cls)]
    names += [f"--no_{key}" for key in DEFAULT_CALLBACKS]
    names += list(FEATURE_FLAGS)
    return ", ".join(names)


def _init_params(cls: type) -> list[str]:
    return [name for name in inspect.signature(cls.__init__).parameters if name != "self"]


class _OneLineErrors(LightningArgumentParser):
    """Lightning's parser whose usage errors are one line naming the subcommand, exit status 2."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error or debugging():
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        exit_with_usage_error(prog, message, f"{prog} --help lists the options")


class SFTCLI(LightningCLI):
    """``LightningCLI`` defaulting to the main job (``configs/demo.yaml``), with LoRA and EfficiencyMonitor on.

    Any LightningModule / LightningDataModule can replace the defaults (``--model my.Module``), since
    the callbacks work on any module. A callback class given in ``--trainer.callbacks`` replaces the
    flag-configured instance of that class, so nothing is added twice.
    """

    def __init__(self, args: ArgsType = None, run: bool = True, **kwargs: Any) -> None:
        options: dict[str, Any] = {
            "model_class": pl.LightningModule,
            "datamodule_class": pl.LightningDataModule,
            "subclass_mode_model": True,
            "subclass_mode_data": True,
            "parser_class": _OneLineErrors,
            "seed_everything_default": 0,
            "save_config_kwargs": {"overwrite": True},
            "parser_kwargs": {
                "prog": "lightning-sft",
                "description": "Fine-tune LLMs cheaply with Lightning. Run `lightning-sft SUBCOMMAND --help`.",
                "epilog": (
                    f"{_commands_epilog()} fit, validate and test take the Trainer, --model and --data options plus"
                    f" {_flag_summary()}. LoRA and EfficiencyMonitor are on by default. `lightning-sft COMMAND --help`"
                    " shows a command's options."
                ),
                # The main job's settings; flags and --config files override them. Without subcommands
                # (run=False) there is only the main parser.
                **(
                    {name: {"default_config_files": [str(DEFAULT_CONFIG)]} for name in ("fit", "validate", "test")}
                    if run
                    else {"default_config_files": [str(DEFAULT_CONFIG)]}
                ),
            },
            **kwargs,
        }
        super().__init__(args=args, run=run, **options)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # No `predict`: CausalLM has no predict_step.
        return {name: skip for name, skip in LightningCLI.subcommands().items() if name != "predict"}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for key, cls in DEFAULT_CALLBACKS.items():
            parser.add_argument(
                f"--no_{key}", action="store_true", help=f"Do not add the {cls.__name__} callback of --{key}.*."
            )
            parser.add_lightning_class_args(cls, key)
        for flag in FEATURE_FLAGS.values():
            flag.add_to(parser)

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        """Lightning's, adding the flag-built callbacks whose class is not already in ``trainer.callbacks``.

        Without an explicit ``--trainer.logger``, logs go to TensorBoard and CSV in one version directory.
        """
        config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        if config.get("logger") in (None, True):
            root = config.get("default_root_dir") or "."
            csv_logger = CSVLogger(root, name="lightning_logs")
            config["logger"] = [csv_logger, TensorBoardLogger(root, name="lightning_logs", version=csv_logger.version)]
        explicit = config.get("callbacks") or []
        if not isinstance(explicit, list):  # a config file may give a single callback
            explicit = [explicit]
        config["callbacks"] = explicit
        persistent = self.trainer_defaults.get("callbacks") or []
        present = explicit + (persistent if isinstance(persistent, list) else [persistent])

        candidates: list[tuple[str, Callback]] = [
            (f"--{key}.*", self._get(self.config_init, key))
            for key in self._parser(self.subcommand).callback_keys
            if not self._get(self.config_init, f"no_{key}", False)
        ]
        for flag in FEATURE_FLAGS.values():
            callback = flag.callback(self._get(self.config_init, flag.dest))
            if callback is not None:
                candidates.append((flag.name, callback))

        extra: list[Callback] = []
        for source, callback in candidates:
            if any(isinstance(cb, type(callback)) for cb in present):
                rank_zero_info(f"Using the {type(callback).__name__} from trainer.callbacks; ignoring {source}.")
            else:
                extra.append(callback)
        chosen = present + extra
        for callback in list(extra):
            # A default the run's other callbacks exclude (LoRA beside SparseFineTuning) is left out.
            replacing = [cb for cb in chosen if type(callback).__name__ in getattr(type(cb), "excludes", {})]
            if replacing:
                replaced, by = type(callback).__name__, type(replacing[0]).__name__
                rank_zero_info(f"{by} is on, so the default {replaced} is not added.")
                extra.remove(callback)
        return self._instantiate_trainer(config, extra)

    def before_fit(self) -> None:
        """Score the untouched base on the test split, so the summary can show what fine-tuning changed."""
        self._started = time.perf_counter()
        self._before = self._test_metrics()

    def after_fit(self) -> None:
        """Save the adapter (peft layout) or sparse diff, test again, and print and save the run summary."""
        directory = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        adapter = diff = None
        if any(isinstance(cb, LoRA) for cb in self.trainer.callbacks) and lora_layers(self.model):
            adapter = save_adapter(self.model, directory / "adapter")  # every rank: a sharded model is gathered
        if any(isinstance(cb, SparseFineTuning) for cb in self.trainer.callbacks) and sparse_delta_layers(self.model):
            diff = save_diff(self.model, directory / "diff.safetensors")
        after = self._test_metrics()
        monitor = next((cb for cb in self.trainer.callbacks if isinstance(cb, EfficiencyMonitor)), None)
        summary = run_summary(
            self.trainer, self.model, self._before, after, monitor, time.perf_counter() - self._started, adapter, diff
        )
        search = next((cb for cb in self.trainer.callbacks if isinstance(cb, AdaptiveRankSearch)), None)
        if search is not None and search.record is not None:
            summary["rank_search"] = search.record
        if self.trainer.is_global_zero:
            (directory / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            print(format_summary(summary))

    def _test_metrics(self) -> dict[str, float]:
        """Test-split metrics, or {} when the model or data has no test step/split."""
        if self.datamodule is None or not is_overridden("test_step", self.model, pl.LightningModule):
            return {}
        if not is_overridden("test_dataloader", self.datamodule, pl.LightningDataModule):
            return {}
        results = self.trainer.test(self.model, datamodule=self.datamodule, verbose=False)
        return {key: float(value) for key, value in results[0].items()} if results else {}


def main(args: list[str] | None = None) -> None:
    """Console entry: ``lightning-sft {fit,validate,test,bench,diff,federated,plan,pretrain,report} ...``.

    Usage errors (a bad flag or value, a check of ours refusing the input) print one line and exit with
    status 2; ``LSFT_DEBUG=1`` shows their traceback (see ``lightning_sft.usage``).
    """
    argv = sys.argv[1:] if args is None else args
    prog = "lightning-sft" + (f" {argv[0]}" if argv[:1] and not argv[0].startswith("-") else "")
    with usage_errors(prog):
        if argv[:1] and argv[0] in PLAIN_SUBCOMMANDS:
            module = importlib.import_module(PLAIN_SUBCOMMANDS[argv[0]])  # lazy: training needs none of them
            code = module.main(argv[1:])
            if code:
                raise SystemExit(code)
            return
        SFTCLI(args=args)


if __name__ == "__main__":
    main()
