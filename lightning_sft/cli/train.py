"""``lightning-sft fit|validate|test``: Lightning's CLI with this package's callbacks as first-class flags.

``lightning-sft fit`` runs the main job from ``configs/demo.yaml`` (LoRA fine-tuning of the shipped base
on the embedded task); every key can be overridden by a flag, and ``--model`` / ``--data`` take other
classes. See ``docs/cli.md``.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, NoReturn

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ProgressBar
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.imports import _RICH_AVAILABLE
from lightning.pytorch.utilities.model_helpers import is_overridden

from lightning_sft.adapters import lora_layers, save_adapter
from lightning_sft.callbacks import AdaptiveRankSearch, EfficiencyMonitor, LoRA, SparseFineTuning
from lightning_sft.cli import commands_epilog
from lightning_sft.cli.flags import DEFAULT_CALLBACKS, FEATURE_FLAGS, flag_summary
from lightning_sft.cli.progress import StepProgressBar
from lightning_sft.sparse_ft import save_diff, sparse_delta_layers
from lightning_sft.summary import format_summary, run_summary
from lightning_sft.usage import debugging, exit_with_usage_error

DEFAULT_CONFIG = Path(__file__).parent.parent / "configs" / "demo.yaml"


class _OneLineErrors(LightningArgumentParser):
    """Lightning's parser whose usage errors are one line naming the subcommand, exit status 2."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error or debugging():
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        exit_with_usage_error(prog, message, f"{prog} --help lists the options")


def _quiet_lightning_adverts() -> None:
    """Drop what every fit printed that is no advice about the run: Lightning's cloud-service "Tip" lines,
    and the pytree deprecation Lightning's own code triggers on this torch (nothing a user can act on)."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in logger.filters):
            logger.addFilter(_DropTips())
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("\N{ELECTRIC LIGHT BULB} Tip:")


class SFTCLI(LightningCLI):
    """``LightningCLI`` defaulting to the main job (``configs/demo.yaml``), with LoRA and EfficiencyMonitor on.

    Any LightningModule / LightningDataModule can replace the defaults (``--model my.Module``), since
    the callbacks work on any module. A callback class given in ``--trainer.callbacks`` replaces the
    flag-configured instance of that class, so nothing is added twice.
    """

    def __init__(self, args: ArgsType = None, run: bool = True, **kwargs: Any) -> None:
        _quiet_lightning_adverts()
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
                    f"{commands_epilog()} fit, validate and test take the Trainer, --model and --data options plus"
                    f" {flag_summary()}. LoRA and EfficiencyMonitor are on by default. `lightning-sft COMMAND --help`"
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
        wants_bar = config.get("enable_progress_bar") is not False
        if wants_bar and _RICH_AVAILABLE and not any(isinstance(cb, ProgressBar) for cb in present):
            extra.append(StepProgressBar())  # steps of max_steps, not batches of an epoch
        chosen = present + extra
        for callback in list(extra):
            # A default the run's other callbacks exclude (LoRA beside SparseFineTuning) is left out.
            replacing = [cb for cb in chosen if type(callback).__name__ in getattr(type(cb), "excludes", {})]
            if replacing:
                replaced, by = type(callback).__name__, type(replacing[0]).__name__
                rank_zero_info(f"{by} is on, so the default {replaced} is not added.")
                extra.remove(callback)
        return self._instantiate_trainer(config, extra)

    def _run_subcommand(self, subcommand: str) -> None:
        """Lightning's, removing the log directory a failed run created when it holds only the logs of the
        failure (no checkpoint, adapter or diff), so failed attempts leave no ``version_N`` behind."""
        log_dir = Path(self.trainer.log_dir) if self.trainer.log_dir else None
        existed = log_dir is not None and log_dir.exists()
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            if log_dir is not None and not existed and self.trainer.is_global_zero:
                _remove_if_only_logs(log_dir)
            raise

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
        fit_metrics = dict(self.trainer.callback_metrics)  # the test pass below replaces them
        after = self._test_metrics()
        monitor = next((cb for cb in self.trainer.callbacks if isinstance(cb, EfficiencyMonitor)), None)
        summary = run_summary(
            self.trainer, self.model, self._before, after, monitor, time.perf_counter() - self._started, adapter, diff,
            fit_metrics,
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


# What the loggers and LightningCLI write into a run directory before any training result exists.
_LOG_ONLY = ("events.out.tfevents.*", "hparams.yaml", "metrics.csv", "config.yaml")


def _remove_if_only_logs(directory: Path) -> None:
    entries = list(directory.iterdir()) if directory.is_dir() else []
    if all(entry.is_file() and any(entry.match(pattern) for pattern in _LOG_ONLY) for entry in entries):
        shutil.rmtree(directory, ignore_errors=True)
