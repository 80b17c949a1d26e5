"""Sparse diff files: index coding, exact apply/revert, every refusal, atomic writes, LoRA export, the CLI."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig

from lightning_sft import LoRAConfig, inject_lora, merge_adapter
from lightning_sft.sparse_ft.injection import inject_sparse_deltas
from lightning_sft.cli import main as cli_main
from lightning_sft.fingerprint import base_parameters, fingerprint_tensors
from lightning_sft.sparse_ft import (
    DiffError,
    apply_diff,
    export_lora_diff,
    read_diff,
    revert_diff,
    save_diff,
    sparse_delta_layers,
)
from lightning_sft.sparse_ft.index_coding import decode_indices, decode_signed, encode_indices, encode_signed

pytestmark = pytest.mark.usefixtures("one_thread")


# --- index coding ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("numel", [1, 10, 1000, 10**6])
def test_indices_round_trip(numel: int) -> None:
    g = torch.Generator().manual_seed(numel)
    for count in {0, 1, min(numel, 7), numel // 100, numel // 2}:
        indices = torch.randperm(numel, generator=g)[:count].sort().values
        assert torch.equal(decode_indices(encode_indices(indices), count, numel), indices)


def test_large_gaps_and_the_size_at_one_percent() -> None:
    indices = torch.tensor([0, 127, 128, 2**14 + 128, 2**40, 2**62])
    assert torch.equal(decode_indices(encode_indices(indices), 6, 2**63 - 1), indices)
    g = torch.Generator().manual_seed(0)
    numel = 10**6
    one_percent = torch.randperm(numel, generator=g)[: numel // 100].sort().values
    assert encode_indices(one_percent).numel() / one_percent.numel() < 1.35  # int32 would be 4 bytes each


def test_bad_indices_and_streams_are_refused() -> None:
    for bad in ([3, 1], [2, 2], [-1, 4]):
        with pytest.raises(ValueError, match="strictly increasing"):
            encode_indices(torch.tensor(bad))
    stream = encode_indices(torch.tensor([5, 300, 9000]))
    with pytest.raises(ValueError, match="expected 4"):
        decode_indices(stream, 4, 10**4)
    with pytest.raises(ValueError, match="past the end"):
        decode_indices(stream, 3, 9000)
    with pytest.raises(ValueError, match="complete values"):
        decode_indices(stream[:-1], 3, 10**4)  # truncated inside the last index


def test_signed_values_round_trip_and_small_ones_take_one_byte() -> None:
    values = torch.tensor([0, -1, 1, -64, 63, 2**40, -(2**40), 2**63 - 1, -(2**63)])
    assert torch.equal(decode_signed(encode_signed(values), values.numel()), values)
    assert encode_signed(torch.arange(-64, 64)).numel() == 128


def test_fingerprint_patches_equal_the_fingerprint_of_the_patched_tensors() -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(100, 90, generator=g), "b": torch.randn(7, generator=g)}
    indices = torch.tensor([0, 5, 4000, 8999])
    values = torch.tensor([1.0, 2.0, 3.0, 4.0])
    patched = dict(tensors)
    patched["a"] = tensors["a"].clone()
    patched["a"].view(-1)[indices] = values
    assert fingerprint_tensors(tensors.items(), {"a": (indices, values)}) == fingerprint_tensors(patched.items())
    assert fingerprint_tensors(tensors.items()) != fingerprint_tensors(patched.items())


# --- diffs of a trained module --------------------------------------------------------------------------


def _config(hidden: int = 32) -> LlamaConfig:
    return LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)


def _base(seed: int = 0, hidden: int = 32, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(_config(hidden)).to(dtype).eval()


def _tuned(seed: int = 0, scale: float = 0.05, dtype: torch.dtype = torch.float32, density: float = 0.05) -> nn.Module:
    """A base with sparse deltas drawn at random: ``scale`` sets how large they are against the weights."""
    model = _base(seed, dtype=dtype)
    inject_sparse_deltas(model, density, "random")
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for layer in sparse_delta_layers(model).values():
            numel = layer.base_layer.weight.numel()
            layer.delta_indices.copy_(torch.randperm(numel, generator=g)[: layer.count])
            layer.delta_values.copy_(torch.randn(layer.count, generator=g) * scale)
    return model


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in base_parameters(model).items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a)


@pytest.mark.parametrize(("dtype", "scale"), [(torch.float32, 0.005), (torch.float32, 1.0), (torch.bfloat16, 0.05)])
def test_apply_reproduces_the_tuned_model_and_revert_restores_the_base_bit_for_bit(
    dtype: torch.dtype, scale: float, tmp_path: Path
) -> None:
    tuned = _tuned(scale=scale, dtype=dtype)
    path = save_diff(tuned, tmp_path / "d.safetensors")
    diff = read_diff(path)
    if scale == 1.0:  # deltas far larger than most weights: the exact-revert fixups must be in use
        assert sum(t.fixup_positions.numel() for t in diff.tensors.values()) > 0.2 * diff.nnz
    model = _base(dtype=dtype)
    base = _weights(model)
    apply_diff(model, path)
    expected = {name: param.detach().clone() for name, param in base.items()}
    for layer_name, layer in sparse_delta_layers(tuned).items():
        expected[f"{layer_name}.weight"] = layer.tuned_weight()
    assert _same(_weights(model), expected)
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, tuned(ids).logits)
    revert_diff(model, path)
    assert _same(_weights(model), base)


def test_the_diff_records_what_it_holds(tmp_path: Path) -> None:
    tuned = _tuned()
    path = save_diff(tuned, tmp_path / "d.safetensors")
    diff = read_diff(path)
    layers = sparse_delta_layers(tuned)
    assert set(diff.tensors) == {f"{name}.weight" for name in layers}  # the base model's own names
    assert diff.nnz == sum(layer.count for layer in layers.values())
    assert diff.info == {"source": "sparse-finetuning", "selection": "random", "dtype": "float32"}
    assert diff.ideal_bytes == 4 * diff.nnz
    assert diff.base_fingerprint == fingerprint_tensors(base_parameters(_base()).items())
    assert 0.045 < diff.density < 0.055


def _refused(model: nn.Module, action, path: Path, match: str) -> None:
    before = _weights(model)
    with pytest.raises(DiffError, match=match):
        action(model, path)
    assert _same(_weights(model), before)


def test_a_diff_for_another_base_or_layout_is_refused_and_the_model_untouched(tmp_path: Path) -> None:
    path = save_diff(_tuned(), tmp_path / "d.safetensors")
    _refused(_base(seed=1), apply_diff, path, "not the base it was made for")
    _refused(_base(hidden=64), apply_diff, path, "Shape mismatch")
    _refused(_base(dtype=torch.bfloat16), apply_diff, path, "load the model in torch.float32")
    _refused(nn.Sequential(nn.Linear(4, 4)), apply_diff, path, "another architecture")
    model = _base()
    _refused(model, revert_diff, path, "not applied")
    apply_diff(model, path)
    _refused(model, apply_diff, path, "already applied")
    # A model changed after the diff was applied is not "the base with this diff applied".
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.view(-1)[read_diff(path).tensors[
            "model.layers.0.mlp.up_proj.weight"].indices[0]] += 1.0
    _refused(model, revert_diff, path, "differs at the diff's entries")


def test_verify_base_false_applies_plain_deltas_to_another_base(tmp_path: Path) -> None:
    path = save_diff(_tuned(), tmp_path / "d.safetensors")
    model = _base(seed=1)
    before = _weights(model)
    apply_diff(model, path, verify_base=False)
    diff = read_diff(path)
    for name, t in diff.tensors.items():
        expected = before[name].reshape(-1).clone()
        expected[t.indices] += t.values
        assert torch.equal(_weights(model)[name].reshape(-1), expected)


def test_corrupted_truncated_and_foreign_files_are_refused(tmp_path: Path) -> None:
    path = save_diff(_tuned(), tmp_path / "d.safetensors")
    data = path.read_bytes()
    model = _base()
    flipped = tmp_path / "flipped.safetensors"
    flipped.write_bytes(data[:-10] + bytes([data[-10] ^ 0x01]) + data[-9:])
    _refused(model, apply_diff, flipped, "corrupted: its stored bytes")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    _refused(model, apply_diff, truncated, "corrupted or truncated")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    _refused(model, apply_diff, garbage, "corrupted or truncated")
    foreign = tmp_path / "adapter.safetensors"
    save_file({"w": torch.zeros(3)}, str(foreign))
    _refused(model, apply_diff, foreign, "not a sparse diff")
    with pytest.raises(FileNotFoundError, match="save_diff"):
        read_diff(tmp_path / "missing.safetensors")


def test_an_interrupted_save_leaves_the_previous_file_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save_diff(_tuned(seed=0), tmp_path / "d.safetensors")
    previous = path.read_bytes()

    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr("lightning_sft.sparse_ft.diff_file.save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_diff(_tuned(seed=3), path)
    assert path.read_bytes() == previous
    assert [p.name for p in tmp_path.iterdir()] == ["d.safetensors"]  # no temporary file left behind


def test_nothing_to_save_and_non_finite_deltas_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no sparse deltas"):
        save_diff(_base(), tmp_path / "d.safetensors")
    tuned = _tuned()
    with torch.no_grad():
        next(iter(sparse_delta_layers(tuned).values())).delta_values[0] = float("nan")
    with pytest.raises(DiffError, match="not all finite"):
        save_diff(tuned, tmp_path / "d.safetensors")
    assert not (tmp_path / "d.safetensors").exists()


# --- LoRA adapters as diffs ------------------------------------------------------------------------------


def _with_lora(seed: int = 0) -> nn.Module:
    model = _base(seed)
    inject_lora(model, LoRAConfig(r=2, target_modules=["q_proj", "down_proj"]), torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_B"):
                param.copy_(torch.randn(param.shape, generator=g) * 0.1)
    return model


def test_a_full_lora_export_applies_exactly_as_merging_does(tmp_path: Path) -> None:
    path = export_lora_diff(_with_lora(), tmp_path / "lora.safetensors")
    diff = read_diff(path)
    assert diff.info["selection"] == "lora-merged" and diff.info["energy_kept"] == 1.0
    assert set(diff.tensors) == {f"model.layers.{i}.{p}.weight" for i in (0, 1) for p in ("self_attn.q_proj", "mlp.down_proj")}
    merged = merge_adapter(_with_lora(), unload=True)
    model = _base()
    base = _weights(model)
    apply_diff(model, path)
    assert _same(_weights(model), _weights(merged))
    revert_diff(model, path)
    assert _same(_weights(model), base)


def test_a_sparsified_lora_export_keeps_the_largest_changes(tmp_path: Path) -> None:
    path = export_lora_diff(_with_lora(), tmp_path / "lora.safetensors", density=0.1)
    diff = read_diff(path)
    assert 0.09 < diff.density < 0.11
    assert 0.1 < diff.info["energy_kept"] < 1.0
    with pytest.raises(ValueError, match="no LoRA adapters"):
        export_lora_diff(_base(), tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="density"):
        export_lora_diff(_with_lora(), tmp_path / "x.safetensors", density=0)


# --- the command line ------------------------------------------------------------------------------------


def _model_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "base"
    _base().save_pretrained(directory)
    (directory / "tokenizer.json").write_text("{}")
    return directory


def test_cli_inspect_apply_and_revert_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base_dir = _model_dir(tmp_path)
    path = save_diff(_tuned(), tmp_path / "d.safetensors")
    cli_main(["diff", "inspect", str(path)])
    text = capsys.readouterr().out
    assert "x the values alone" in text and "model.layers.0.mlp.up_proj.weight" in text
    cli_main(["diff", "inspect", str(path), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["nnz"] == read_diff(path).nnz and report["selection"] == "random"

    cli_main(["diff", "apply", str(path), "--model", str(base_dir), "--out", str(tmp_path / "tuned")])
    assert (tmp_path / "tuned" / "tokenizer.json").is_file()
    tuned_weights = load_file(tmp_path / "tuned" / "model.safetensors")
    cli_main(["diff", "revert", str(path), "--model", str(tmp_path / "tuned"), "--out", str(tmp_path / "back")])
    original = load_file(base_dir / "model.safetensors")
    assert _same(load_file(tmp_path / "back" / "model.safetensors"), original)
    assert not _same(tuned_weights, original)


def test_cli_errors_exit_with_a_message_and_write_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base_dir = _model_dir(tmp_path)
    path = save_diff(_tuned(seed=0), tmp_path / "d.safetensors")
    other = save_diff(_tuned(seed=5), tmp_path / "other.safetensors")
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["diff", "revert", str(path), "--model", str(base_dir), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and "not applied" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["diff", "apply", str(other), "--model", str(base_dir), "--out", str(tmp_path / "out")])
    assert "not the base" in capsys.readouterr().err
    (tmp_path / "exists").mkdir()
    with pytest.raises(SystemExit):
        cli_main(["diff", "apply", str(path), "--model", str(base_dir), "--out", str(tmp_path / "exists")])
    assert "already exists" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "d.safetensors", "exists", "other.safetensors"]


def test_fit_with_the_flag_writes_a_diff_that_applies_to_the_base(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", ["lightning-sft"])
    model_dir = _model_dir(tmp_path)
    cli_main([
        "fit", "--sft-density", "0.05", "--model", "lightning_sft.modules.CausalLM", "--model.model", str(model_dir),
        "--model.decay_steps", "null", "--model.warmup_steps", "0", "--data", "lightning_sft.data.RandomTokenData",
        "--data.vocab_size", "64", "--data.seq_len", "12", "--data.num_train", "32", "--data.num_val", "4",
        "--data.batch_size", "4", "--trainer.max_steps", "3", "--trainer.default_root_dir", str(tmp_path / "runs"),
        "--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--trainer.val_check_interval", "3",
    ])
    (summary,) = (tmp_path / "runs").rglob("summary.json")
    record = json.loads(summary.read_text())
    assert record["adapter"] is None and record["diff"].endswith("diff.safetensors")
    cli_main(["diff", "apply", record["diff"], "--model", str(model_dir), "--out", str(tmp_path / "tuned")])
    assert not _same(load_file(tmp_path / "tuned" / "model.safetensors"), load_file(model_dir / "model.safetensors"))
