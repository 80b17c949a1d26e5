"""LoRA injection, equivalence with peft, merging, freezing, persistence and refusals."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_sft import (
    LoRA,
    LoRAConfig,
    inject_lora,
    load_adapter,
    load_from_checkpoint,
    lora_layers,
    merge_adapter,
    save_adapter,
    unmerge_adapter,
)
from lightning_sft.adapters import base_fingerprint
from tiny_models import EXPECTED_ADAPTED, FAMILIES, CausalLMModule, batch, build, first_output, loader

peft = pytest.importorskip("peft")


def _randomize_b(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)


@pytest.mark.parametrize("family", FAMILIES)
def test_all_linear_adapts_every_block_layer_but_not_the_head(family: str) -> None:
    model = build(family)
    names = inject_lora(model, LoRAConfig(r=4))
    assert len(names) == EXPECTED_ADAPTED[family]
    assert not any(n.endswith("lm_head") for n in names)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{part}" for n in names for part in "AB"}


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_b_is_identity_and_matches_peft_outputs_and_gradients(family: str, tmp_path) -> None:
    model, reference = build(family), build(family)
    inputs = batch()
    base_out = first_output(model, inputs)
    inject_lora(model, LoRAConfig(r=4, alpha=8))
    assert torch.equal(first_output(model, inputs), base_out)

    _randomize_b(model)
    save_adapter(model, tmp_path)
    peft_model = peft.PeftModel.from_pretrained(reference, tmp_path, is_trainable=True)
    ours, theirs = first_output(model, inputs), first_output(peft_model, inputs)
    assert not torch.allclose(ours, base_out)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)

    ours.square().mean().backward()
    theirs.square().mean().backward()
    peft_params = dict(peft_model.named_parameters())
    for name, layer in lora_layers(model).items():
        for part in "AB":
            theirs_grad = peft_params[f"base_model.model.{name}.lora_{part}.default.weight"].grad
            torch.testing.assert_close(getattr(layer, f"lora_{part}").grad, theirs_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_merge_unmerge_round_trip_and_unload(family: str) -> None:
    model = build(family)
    inject_lora(model, LoRAConfig(r=4, alpha=8))
    _randomize_b(model)
    inputs = batch()
    before = first_output(model, inputs)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    merge_adapter(model)
    torch.testing.assert_close(first_output(model, inputs), before, rtol=1e-5, atol=1e-5)
    unmerge_adapter(model)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param, weights[name], rtol=0, atol=1e-6)
    plain = build(family)
    merge_adapter(model, unload=True)
    assert not lora_layers(model)
    assert model.state_dict().keys() == plain.state_dict().keys()
    torch.testing.assert_close(first_output(model, inputs), before, rtol=1e-5, atol=1e-5)


def test_rslora_scaling_and_rank_pattern() -> None:
    model = build("llama")
    inject_lora(model, LoRAConfig(r=4, alpha=8, use_rslora=True, rank_pattern={"v_proj": 2}))
    layers = lora_layers(model)
    assert layers["model.layers.0.self_attn.q_proj"].scaling == pytest.approx(8 / 2)
    assert layers["model.layers.0.self_attn.v_proj"].r == 2
    assert layers["model.layers.0.self_attn.v_proj"].scaling == pytest.approx(8 / 2**0.5)


def test_suffix_list_regex_and_exclude_select_targets() -> None:
    by_suffix = inject_lora(build("llama"), LoRAConfig(target_modules=["q_proj", "v_proj"]))
    assert len(by_suffix) == 4 and all(n.endswith(("q_proj", "v_proj")) for n in by_suffix)
    by_regex = inject_lora(build("llama"), LoRAConfig(target_modules=r".*layers\.1\.mlp\..*"))
    assert sorted(n.rsplit(".", 1)[-1] for n in by_regex) == ["down_proj", "gate_proj", "up_proj"]
    excluded = inject_lora(build("llama"), LoRAConfig(exclude_modules=["mlp.down_proj"]))
    assert len(excluded) == 12 and not any(n.endswith("down_proj") for n in excluded)


def test_plain_torch_module_and_tied_head_exclusion() -> None:
    class TiedLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(16, 8)
            self.blocks = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8))
            self.head = nn.Linear(8, 16, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.head(self.blocks(self.embed(ids)))

    model = TiedLM()
    assert inject_lora(model, LoRAConfig(r=2)) == ["blocks.0", "blocks.2"]
    model(torch.tensor([[1, 2, 3]])).sum().backward()
    assert model.embed.weight.grad is None and model.blocks[0].lora_B.grad is not None


# --- refusals: clear errors, and the model is left untouched --------------------------------

@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"r": 0}, "positive integer"),
        ({"r": -2}, "positive integer"),
        ({"r": 2.5}, "positive integer"),
        ({"alpha": 0}, "positive number"),
        ({"alpha": float("nan")}, "positive number"),
        ({"dropout": 1.0}, r"\[0, 1\)"),
        ({"dropout": -0.1}, r"\[0, 1\)"),
        ({"target_modules": []}, "non-empty list"),
        ({"target_modules": "(unclosed"}, "regular expression"),
        ({"rank_pattern": {"q_proj": 0}}, "rank_pattern"),
    ],
)
def test_bad_arguments_are_refused_at_construction(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LoRA(**kwargs)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.clone() for n, t in model.state_dict().items()}


def _assert_untouched(model: nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    assert not lora_layers(model)
    assert model.state_dict().keys() == snapshot.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in snapshot.items())
    assert all(p.requires_grad for p in model.parameters())


def test_targets_matching_nothing_name_the_available_layers() -> None:
    model = build("llama")
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match="matches no linear layer.*'q_proj'"):
        inject_lora(model, LoRAConfig(target_modules=["query"]))
    _assert_untouched(model, snapshot)


@pytest.mark.parametrize("target", [["embed_tokens"], ["q_proj", "mlp"]])
def test_unsupported_layer_type_is_refused_before_any_change(target: list[str]) -> None:
    model = build("llama")
    snapshot = _snapshot(model)
    with pytest.raises(TypeError, match="nn.Linear and transformers Conv1D"):
        inject_lora(model, LoRAConfig(target_modules=target))
    _assert_untouched(model, snapshot)


def test_callback_added_twice_is_refused_before_any_change(tmp_path) -> None:
    module = CausalLMModule()
    snapshot = _snapshot(module)
    trainer = pl.Trainer(default_root_dir=tmp_path, max_steps=1, callbacks=[LoRA(), LoRA(r=4)], logger=False,
                         enable_progress_bar=False, enable_checkpointing=False)
    with pytest.raises(ValueError, match="added 2 times"):
        trainer.fit(module, loader())
    _assert_untouched(module, snapshot)


# --- training through Lightning --------------------------------------------------------------

def _trainer(tmp_path, steps: int, **kwargs) -> pl.Trainer:
    kwargs.setdefault("logger", False)
    kwargs.setdefault("enable_checkpointing", False)
    return pl.Trainer(default_root_dir=tmp_path, max_steps=steps, accelerator="cpu", devices=1,
                      enable_progress_bar=False, enable_model_summary=False, deterministic=True, **kwargs)


def test_frozen_parameters_get_no_gradient_and_no_optimizer_state(tmp_path) -> None:
    module = CausalLMModule()
    frozen_before = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainer = _trainer(tmp_path, 3, callbacks=[LoRA(r=4)])
    trainer.fit(module, loader())
    optimizer = trainer.optimizers[0]
    with_state = {id(p) for p in optimizer.state}
    for name, param in module.named_parameters():
        is_adapter = name.endswith((".lora_A", ".lora_B"))
        assert param.requires_grad == is_adapter
        assert (id(param) in with_state) == is_adapter, name
        if not is_adapter:
            assert param.grad is None
            assert torch.equal(param, frozen_before[name.replace(".base_layer.", ".")])


def _adapter_weights(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def test_resume_mid_run_equals_uninterrupted_run(tmp_path) -> None:
    # Checkpoint at an epoch boundary (3 batches per epoch) and no adapter dropout: Lightning
    # checkpoints neither a plain DataLoader's position nor the global RNG.
    pl.seed_everything(0)
    straight = CausalLMModule()
    _trainer(tmp_path / "a", 6, callbacks=[LoRA(r=4)]).fit(straight, loader(n=12))

    pl.seed_everything(0)
    first = CausalLMModule()
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    _trainer(tmp_path / "b", 3, callbacks=[LoRA(r=4), ckpt], enable_checkpointing=True).fit(first, loader(n=12))
    (path,) = list((tmp_path / "ckpt").glob("*.ckpt"))

    pl.seed_everything(123)  # a different seed: everything must come from the checkpoint
    resumed = CausalLMModule()
    _trainer(tmp_path / "c", 6, callbacks=[LoRA(r=4)]).fit(resumed, loader(n=12), ckpt_path=path)
    expected, got = _adapter_weights(straight), _adapter_weights(resumed)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0)
    assert not torch.equal(got[name], _adapter_weights(first)[name])


def test_checkpoint_rank_wins_on_resume_and_load_from_checkpoint_rebuilds(tmp_path) -> None:
    module = CausalLMModule()
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    _trainer(tmp_path, 2, callbacks=[LoRA(r=2), ckpt], enable_checkpointing=True).fit(module, loader())
    path = tmp_path / "ckpt" / "last.ckpt"

    resumed = CausalLMModule()
    with pytest.warns(UserWarning, match="rank 2 in the checkpoint"):
        _trainer(tmp_path, 3, callbacks=[LoRA(r=8)]).fit(resumed, loader(), ckpt_path=path)
    assert {layer.r for layer in lora_layers(resumed).values()} == {2}

    loaded = load_from_checkpoint(CausalLMModule, path)
    assert {layer.r for layer in lora_layers(loaded).values()} == {2}
    for name, value in module.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value, rtol=0, atol=0)


def test_second_fit_keeps_the_adapters(tmp_path) -> None:
    module, callback = CausalLMModule(), LoRA(r=4)
    _trainer(tmp_path, 1, callbacks=[callback]).fit(module, loader())
    first = set(lora_layers(module))
    _trainer(tmp_path, 1, callbacks=[callback]).fit(module, loader())
    assert set(lora_layers(module)) == first


# --- adapter files -----------------------------------------------------------------------------

def test_save_load_round_trip_through_a_lightning_module(tmp_path) -> None:
    module = CausalLMModule()
    inject_lora(module, LoRAConfig(r=4, alpha=8, rank_pattern={"down_proj": 2}, alpha_pattern={"down_proj": 4}))
    _randomize_b(module)
    save_adapter(module, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]

    fresh = CausalLMModule()
    names = load_adapter(fresh, tmp_path)
    assert len(names) == 14
    assert {n: (l.r, l.alpha) for n, l in lora_layers(fresh).items()} == {
        n: (l.r, l.alpha) for n, l in lora_layers(module).items()
    }
    inputs = batch()
    torch.testing.assert_close(first_output(fresh.net, inputs), first_output(module.net, inputs), rtol=0, atol=0)

    peft_model = peft.PeftModel.from_pretrained(build("llama"), tmp_path)
    torch.testing.assert_close(first_output(peft_model, inputs), first_output(module.net, inputs), rtol=0, atol=1e-6)


def test_load_refuses_another_base_and_wrong_shapes_leaving_the_model_untouched(tmp_path) -> None:
    trained = build("llama", seed=0)
    inject_lora(trained, LoRAConfig(r=4))
    save_adapter(trained, tmp_path)

    other_base = build("llama", seed=1)
    snapshot = _snapshot(other_base)
    with pytest.raises(ValueError, match="different base model"):
        load_adapter(other_base, tmp_path)
    _assert_untouched(other_base, snapshot)
    load_adapter(other_base, tmp_path, verify_base=False)
    assert len(lora_layers(other_base)) == 14

    wider = build("qwen2")  # same layer names, but its q_proj has a bias and the model other weights
    snapshot = _snapshot(wider)
    with pytest.raises(ValueError, match="different base model"):
        load_adapter(wider, tmp_path)
    _assert_untouched(wider, snapshot)

    gpt2 = build("gpt2")
    snapshot = _snapshot(gpt2)
    with pytest.raises(ValueError, match="does not have"):
        load_adapter(gpt2, tmp_path, verify_base=False)
    _assert_untouched(gpt2, snapshot)


def test_load_refuses_shape_mismatch(tmp_path) -> None:
    small = build("llama")
    inject_lora(small, LoRAConfig(r=4))
    save_adapter(small, tmp_path)
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    big = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2))
    snapshot = _snapshot(big)
    with pytest.raises(ValueError, match="Shape mismatch"):
        load_adapter(big, tmp_path, verify_base=False)
    _assert_untouched(big, snapshot)


def test_save_refuses_merged_adapters_and_fingerprint_ignores_adapters() -> None:
    model = build("llama")
    before = base_fingerprint(model)
    inject_lora(model, LoRAConfig(r=4))
    assert base_fingerprint(model) == before
    merge_adapter(model)
    with pytest.raises(RuntimeError, match="unmerge_adapter"):
        save_adapter(model, "unused")
