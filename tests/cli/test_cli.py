"""The ``lightning-sft`` CLI, ``CausalLM`` and ``RandomTokenData``, run in-process on tiny models."""

from __future__ import annotations

import json
import re
import os
import subprocess
import sys
import types
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from transformers import AutoModelForCausalLM

from lightning_sft import EfficiencyMonitor, LoRA, lora_layers
from lightning_sft.cli import train as train_module
from lightning_sft.cli import FeatureFlag, SFTCLI, main
from lightning_sft.data import RandomTokenData
from lightning_sft.modules import PRESETS, CausalLM


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    # LightningCLI warns when both `args` and sys.argv (here: pytest's own) carry arguments.
    monkeypatch.setattr(sys, "argv", ["lightning-sft"])


def _trainer_args(root: Path, *extra: str) -> list[str]:
    return [
        "--trainer.max_steps", "3",
        "--trainer.accelerator", "cpu",
        "--trainer.default_root_dir", str(root),
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--trainer.enable_checkpointing", "false",
        "--trainer.val_check_interval", "3",
        "--data.num_train", "24",
        "--data.num_val", "8",
        "--data.num_test", "8",
        "--data.batch_size", "8",
        *extra,
    ]


def _callbacks_of(cli: SFTCLI, cls: type[Callback]) -> list[Callback]:
    return [cb for cb in cli.trainer.callbacks if isinstance(cb, cls)]


def test_fit_with_lora_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cli = SFTCLI(args=["fit", *_trainer_args(tmp_path, "--lora.r", "4", "--lora.target_modules", "[q_proj,v_proj]")])

    layers = lora_layers(cli.model)
    assert sorted({name.rsplit(".", 1)[-1] for name in layers}) == ["q_proj", "v_proj"]
    assert len(layers) == 2 * cli.model.model.config.num_hidden_layers and {layer.r for layer in layers.values()} == {4}
    trainable = sum(p.numel() for p in cli.model.parameters() if p.requires_grad)
    assert trainable == sum(4 * (layer.in_features + layer.out_features) for layer in layers.values())
    assert len(_callbacks_of(cli, LoRA)) == 1 and len(_callbacks_of(cli, EfficiencyMonitor)) == 1
    assert cli.trainer.global_step == 3

    log_dir = Path(cli.trainer.log_dir)
    adapter = log_dir / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 4 and sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    assert str(adapter) in capsys.readouterr().out  # the summary names it
    assert list(log_dir.glob("events.out.tfevents.*")), "the default TensorBoard logger wrote nothing"
    assert (log_dir / "config.yaml").is_file()


def test_main_job_writes_logs_adapter_summary_and_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["fit", *_trainer_args(tmp_path)])
    run = tmp_path / "lightning_logs" / "version_0"
    assert (run / "adapter" / "adapter_config.json").is_file() and (run / "adapter" / "adapter_model.safetensors").is_file()
    assert list(run.glob("events.out.tfevents.*")) and (run / "metrics.csv").is_file()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["trainable_params"] < summary["total_params"]
    for key in ("train_loss", "val_loss", "val_acc", "test_acc_before", "test_acc_after", "test_loss_before",
                "test_loss_after", "tokens_per_s", "effective_flops"):  # the final test pass keeps the fit's figures
        assert summary[key] is not None, key
    assert summary["test_loss_after"] < summary["test_loss_before"]  # 3 steps already help
    out = capsys.readouterr().out
    assert "Run summary" in out and "test exact match, before" in out
    assert "train loss (last step)" in out and "validation exact match" in out

    other = tmp_path / "other_run"  # a second run, to compare side by side
    other.mkdir()
    (other / "metrics.csv").write_text("epoch,step,train_loss,val_acc\n0,0,3.0,\n0,1,2.5,0.25\n")
    main(["report", str(run), str(other), "--out", str(tmp_path / "report")])
    png = (tmp_path / "report" / "report.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    page = (tmp_path / "report" / "report.html").read_text()
    assert "data:image/png;base64," in page and "test_acc_after" in page
    assert summary["method"] == "LoRA r=16" and "LoRA r=16 (version_0)" in page  # runs are named by their method
    assert "LoRA r=16" in out
    for written in ("report.png", "report.html"):  # readable by others, as any file the user writes
        assert (tmp_path / "report" / written).stat().st_mode & 0o044 == 0o044 or os.umask(os.umask(0)) & 0o044
    with pytest.raises(SystemExit):
        main(["report", str(tmp_path / "missing")])


@pytest.mark.parametrize("class_name", ["lightning_sft.LoRA", "LoRA"])
def test_lora_in_trainer_callbacks_wins(tmp_path: Path, class_name: str) -> None:
    args = _trainer_args(
        tmp_path,
        "--lora.r", "16",
        f"--trainer.callbacks+={class_name}", "--trainer.callbacks.r=2",
        "--trainer.logger", "CSVLogger", "--trainer.logger.save_dir", str(tmp_path),
        "--trainer.log_every_n_steps", "1",
    )
    cli = SFTCLI(args=["fit", *args])

    (lora,) = _callbacks_of(cli, LoRA)
    assert lora.config.r == 2
    assert {layer.r for layer in lora_layers(cli.model).values()} == {2}
    header = (Path(cli.trainer.log_dir) / "metrics.csv").read_text().splitlines()[0]
    assert "train_loss" in header and "efficiency/tokens_per_s" in header


def test_efficiency_in_trainer_callbacks_wins(tmp_path: Path) -> None:
    args = _trainer_args(tmp_path, "--trainer.callbacks+=EfficiencyMonitor", "--trainer.callbacks.prefix=eff/")
    cli = SFTCLI(args=args, run=False)
    (monitor,) = _callbacks_of(cli, EfficiencyMonitor)
    assert monitor.prefix == "eff/"
    assert len(_callbacks_of(cli, LoRA)) == 1


def test_no_flags_turn_default_callbacks_off(tmp_path: Path) -> None:
    cli = SFTCLI(args=_trainer_args(tmp_path, "--no_lora", "--no_efficiency"), run=False)
    assert not _callbacks_of(cli, LoRA) and not _callbacks_of(cli, EfficiencyMonitor)


def test_config_file_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *_trainer_args(tmp_path, "--lora.r", "16", "--model.lr", "1e-3"), "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "class_path: lightning_sft.modules.CausalLM" in printed and "r: 16" in printed
    config = tmp_path / "config.yaml"
    config.write_text(printed)

    cli = SFTCLI(args=["fit", "--config", str(config), "--trainer.max_steps", "1"])
    assert cli.model.hparams.lr == 1e-3
    assert {layer.r for layer in lora_layers(cli.model).values()} == {16}


@pytest.mark.parametrize("words", [["fit", "--help"], ["--help"]])
def test_help_lists_lora_flags(words: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "lightning_sft.cli", *words], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "--lora.r" in result.stdout and "--efficiency.measure_flops" in result.stdout


def test_bad_preset_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["fit", *_trainer_args(tmp_path, "--model.model", "tiny-lama")])
    assert caught.value.code == 2
    assert re.search(r"^lightning-sft fit: error: Unknown model 'tiny-lama'.*sft-llama-5m.*tiny-llama.*local Hugging Face",
                     capsys.readouterr().err, re.MULTILINE)


class _Dummy(Callback):
    def __init__(self, rate: float) -> None:
        self.rate = rate


def test_feature_flag_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    flags = {
        "--dummy-rate": FeatureFlag("--dummy-rate", help="Dummy rate.", type=float, default=0.0, build=_Dummy),
        "--dummy-mode": FeatureFlag(
            "--dummy-mode", help="Dummy mode.", choices=("off", "a", "b"), default="off", build=lambda mode: None
        ),
    }
    monkeypatch.setattr(train_module, "FEATURE_FLAGS", flags)

    cli = SFTCLI(args=_trainer_args(tmp_path, "--dummy-rate", "0.25", "--dummy-mode", "a"), run=False)
    (dummy,) = _callbacks_of(cli, _Dummy)
    assert dummy.rate == 0.25
    assert cli.config["dummy_rate"] == 0.25  # the config-file key

    assert not _callbacks_of(SFTCLI(args=_trainer_args(tmp_path), run=False), _Dummy)  # default means off

    with pytest.raises(SystemExit):
        SFTCLI(args=_trainer_args(tmp_path, "--dummy-mode", "c"), run=False)
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    assert "--dummy-rate" in capsys.readouterr().out

    with pytest.raises(ValueError, match="must be one of the choices"):
        FeatureFlag("--bad", help="", choices=("a",), default="off", build=_Dummy)


def test_bench_is_dispatched_lazily(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []

    def fake_main(argv: list[str]) -> int:
        calls.append(argv)
        return 3 if "--fail" in argv else 0

    monkeypatch.setitem(sys.modules, "lightning_sft.cli.bench", types.SimpleNamespace(main=fake_main))
    main(["bench", "lora", "--steps", "2"])
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--fail"])
    assert exit_info.value.code == 3
    assert calls == [["lora", "--steps", "2"], ["--fail"]]


def test_optimizer_holds_only_the_trainable_parameters() -> None:
    pl.seed_everything(0)
    model = CausalLM(model="tiny-llama", lr=1e-3)
    trainer = pl.Trainer(
        max_steps=1, accelerator="cpu", callbacks=[LoRA(r=2)], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )
    trainer.fit(model, datamodule=RandomTokenData(seq_len=16, batch_size=4, num_train=4, num_val=1))

    optimizer = trainer.optimizers[0]
    params = list(model.parameters())
    frozen = [p for p in params if not p.requires_grad]
    trainable = [p for p in params if p.requires_grad]
    assert frozen and trainable
    held = [p for group in optimizer.param_groups for p in group["params"]]
    assert len(held) == len(trainable) and all(any(p is q for q in trainable) for p in held)
    assert all("exp_avg" in optimizer.state[p] for p in trainable)


def test_warmup_is_linear() -> None:
    model = CausalLM(model="tiny-llama", lr=1.0, warmup_steps=4)
    config = model.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step"
    lrs = []
    for _ in range(6):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert isinstance(CausalLM(model="tiny-llama").configure_optimizers(), torch.optim.AdamW)


@pytest.mark.parametrize(
    "kwargs", [{"lr": 0.0}, {"weight_decay": -0.1}, {"warmup_steps": -1}, {"model": "nope"}]
)
def test_causal_lm_validates_arguments(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        CausalLM(**kwargs)


def test_causal_lm_loads_a_local_directory(tmp_path: Path) -> None:
    reference = AutoModelForCausalLM.from_config(PRESETS["tiny-llama"]())
    reference.save_pretrained(tmp_path)
    loaded = CausalLM(model=str(tmp_path)).model
    torch.testing.assert_close(loaded.state_dict(), reference.state_dict())


def test_random_token_data_is_deterministic() -> None:
    def first_batch(seed: int) -> dict[str, torch.Tensor]:
        data = RandomTokenData(vocab_size=50, seq_len=8, batch_size=2, num_train=4, num_val=2, seed=seed)
        data.setup("fit")
        return next(iter(data.train_dataloader()))

    batch = first_batch(0)
    assert batch["input_ids"].shape == (2, 8) and int(batch["input_ids"].max()) < 50
    torch.testing.assert_close(batch["labels"], batch["input_ids"])
    assert bool(batch["attention_mask"].all())
    torch.testing.assert_close(first_batch(0), batch)
    assert not torch.equal(first_batch(1)["input_ids"], batch["input_ids"])


@pytest.mark.parametrize("kwargs", [{"vocab_size": 0}, {"seq_len": -1}, {"batch_size": 1.5}, {"num_val": True}])
def test_random_token_data_validates_arguments(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        RandomTokenData(**kwargs)


def test_own_model_directory_and_jsonl_data_through_the_same_command(tmp_path: Path) -> None:
    from transformers import AutoTokenizer, LlamaConfig

    from lightning_sft.assets import SHIPPED_MODELS
    from lightning_sft.tasks import Example, write_jsonl

    model_dir = tmp_path / "my_model"
    config = LlamaConfig(vocab_size=4096, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(SHIPPED_MODELS["sft-llama-5m"]).save_pretrained(model_dir)
    for split in ("train", "val", "test"):
        write_jsonl([Example(f"Echo {i}:", f" {i}") for i in range(8)], tmp_path / f"{split}.jsonl")

    cli = SFTCLI(args=["fit", *_trainer_args(tmp_path, "--model.model", str(model_dir),
                                             "--data.train_file", str(tmp_path / "train.jsonl"),
                                             "--data.val_file", str(tmp_path / "val.jsonl"),
                                             "--data.test_file", str(tmp_path / "test.jsonl"))])
    assert cli.model.model.config.hidden_size == 32
    assert cli.datamodule.splits["train"][0] == Example("Echo 0:", " 0")
    summary = json.loads((Path(cli.trainer.log_dir) / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["test_acc_after"] is not None


def test_per_layer_sparsity_from_a_config_file(tmp_path: Path) -> None:
    """The documented way to give per-layer settings: a ContextualSparsity entry in a YAML config."""
    from lightning_sft import ContextualSparsity

    config = tmp_path / "sparsity.yaml"
    config.write_text(
        "trainer:\n"
        "  callbacks:\n"
        "    - class_path: lightning_sft.ContextualSparsity\n"
        "      init_args:\n"
        "        mlp_sparsity: {1: 0.5, '2-4': 0.9}\n"
        "        attn_sparsity: llama3-8b-math10k\n"
        "        calibration_steps: 4\n"
    )
    cli = SFTCLI(args=["--config", str(config), *_trainer_args(tmp_path)], run=False)
    (sparsity,) = _callbacks_of(cli, ContextualSparsity)
    assert dict(sparsity.mlp_sparsity) == {1: 0.5, "2-4": 0.9}
    assert sparsity.attn_sparsity == "llama3-8b-math10k" and sparsity.calibration_steps == 4


def test_help_and_the_docs_list_every_command_from_one_registry(capsys: pytest.CaptureFixture[str]) -> None:
    from generated_docs import check_generated

    from lightning_sft.cli import COMMANDS, command_table

    assert [c.name for c in COMMANDS] == ["fit", "validate", "test", "bench", "diff", "federated", "plan", "pretrain",
                                          "report"]
    main(["--help"])  # every command, not only the three Lightning's CLI runs
    printed = capsys.readouterr().out
    for c in COMMANDS:
        assert re.search(rf"^  {c.name} +{re.escape(c.does.split()[0])}", printed, re.MULTILINE), c.name
    with pytest.raises(SystemExit) as caught:
        main([])
    assert caught.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("lightning-sft: error: choose a command: fit, validate, test, bench, diff, federated, plan")
    check_generated("cli.md", "command list", command_table(), "tests/cli/test_cli.py")


def test_a_failed_fit_leaves_no_log_directory_and_fits_print_no_adverts(tmp_path: Path) -> None:
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "1+1="\n')
    result = subprocess.run(
        [sys.executable, "-m", "lightning_sft.cli", "fit", *_trainer_args(tmp_path), "--data.train_file", str(broken)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"lightning-sft fit: error: {broken}:1:")
    assert not list((tmp_path / "lightning_logs").glob("version_*"))  # nothing left of the failed attempt
    assert "Tip:" not in result.stderr + result.stdout and "LeafSpec" not in result.stderr


def test_the_progress_bar_counts_steps_of_max_steps_across_epochs() -> None:
    from lightning_sft.cli.progress import StepProgressBar

    bar = StepProgressBar()
    seen: list[tuple[float, float | None, str]] = []

    class Watch(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            task = bar.train_progress_bar
            seen.append((task.completed, task.total, task.description.strip()))

    pl.seed_everything(0)
    trainer = pl.Trainer(
        max_steps=6, accelerator="cpu", callbacks=[bar, Watch()], logger=False, enable_checkpointing=False,
        enable_model_summary=False, limit_val_batches=0,
    )
    model = CausalLM(model="tiny-llama", lr=1e-3)
    trainer.fit(model, datamodule=RandomTokenData(seq_len=8, batch_size=2, num_train=8, num_val=1))  # 4 batches/epoch
    assert trainer.current_epoch >= 1  # the fit spans two epochs
    assert [completed for completed, _, _ in seen] == [1, 2, 3, 4, 5, 6]  # Watch runs after the bar updated
    assert {total for _, total, _ in seen} == {6} and seen[-1][2] == "Step"


def test_a_model_directory_without_a_tokenizer_asks_for_data_tokenizer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    bare = tmp_path / "bare_llama"  # weights and config only, as save_pretrained of a model writes them
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)
    LlamaForCausalLM(config).save_pretrained(bare)
    with pytest.raises(SystemExit) as caught:
        main(["fit", *_trainer_args(tmp_path / "runs", "--model.model", str(bare))])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert f"{bare} holds no tokenizer" in err and "--data.tokenizer DIR" in err
    assert "sentencepiece" not in err and "Traceback" not in err


def test_the_model_summary_counts_the_flops_of_one_example_sequence() -> None:
    from lightning.pytorch.utilities.model_summary import summarize
    from torch.utils.flop_counter import FlopCounterMode

    from lightning_sft.modules import CausalLM
    from lightning_sft.modules.causal_lm import SUMMARY_TOKENS

    module = CausalLM(model="tiny-llama")
    assert module.example_input_array.shape == (1, SUMMARY_TOKENS)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        logits = module(module.example_input_array)
    assert logits.shape[:2] == (1, SUMMARY_TOKENS)
    assert summarize(module, max_depth=1).total_flops == counter.get_total_flops() > 0  # not "Total FLOPs: 0"
