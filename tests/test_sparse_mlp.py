"""SparseGatedMLP: exact against the dense MLP with the dropped channels zeroed, dense where it must
be, FLOPs accounting, and clean wrapping/unwrapping of a tiny random LLaMA."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from lightning_sft import LoRAConfig, inject_lora, lora_layers, merge_adapter
from lightning_sft.sparsity import (
    OracleEstimator,
    SparseGatedMLP,
    SparsePlainMLP,
    SparsityState,
    build_estimator,
    gated_mlp_block,
    mlp_flops,
    unwrap_all,
    wrap_gated_mlps,
    wrap_plain_mlps,
)

HIDDEN, INTERMEDIATE = 32, 64


def _model(lora: bool = True, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config).eval()
    if lora:
        inject_lora(model, LoRAConfig(r=4))
        with torch.no_grad():
            for layer in lora_layers(model).values():
                layer.lora_B.normal_(0, 0.1)
    else:
        model.requires_grad_(False)
    return model


def _mlps(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(f"model.layers.{i}.mlp", layer.mlp) for i, layer in enumerate(model.model.layers)]


def _mask(seed: int = 1, shape: tuple[int, int] = (2, 6)) -> torch.Tensor:
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < 0.6
    mask[:, 0], mask[:, -1] = True, False  # both kinds of token in every sample
    return mask


def _lora_params(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if "lora_" in name}


def _run(model: nn.Module, embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Logits, input gradient and LoRA gradients of one forward/backward."""
    model.zero_grad(set_to_none=True)
    x = embeds.clone().requires_grad_(True)
    logits = model(inputs_embeds=x).logits
    logits.square().mean().backward()
    return logits.detach(), x.grad, {n: p.grad.clone() for n, p in _lora_params(model).items()}


def _assert_runs_close(a, b, atol: float = 1e-6) -> None:
    torch.testing.assert_close(a[0], b[0], atol=atol, rtol=1e-5)
    torch.testing.assert_close(a[1], b[1], atol=atol, rtol=1e-5)
    assert a[2].keys() == b[2].keys() and a[2]
    for name in a[2]:
        torch.testing.assert_close(a[2][name], b[2][name], atol=atol, rtol=1e-5, msg=name)


@pytest.mark.parametrize("how", ["strategy-none", "keep-all"])
def test_full_keep_equals_dense(how: str) -> None:
    model = _model()
    embeds = torch.randn(2, 6, HIDDEN)
    dense = _run(model, embeds)
    state = SparsityState()
    if how == "strategy-none":
        names = wrap_gated_mlps(model, state, "none", [0.5, 0.5], _mlps(model))
    else:
        names = wrap_gated_mlps(model, state, "oracle", [0.0, 0.0], _mlps(model))
        assert names == []  # sparsity 0 leaves the layers alone; wrap them at keep = all by hand
        for name, mlp in _mlps(model):
            estimator = build_estimator("oracle", gated_mlp_block(mlp), name)
            parent = model.get_submodule(name.rpartition(".")[0])
            parent.mlp = SparseGatedMLP(mlp, state, estimator, INTERMEDIATE, name)
            names.append(name)
    assert len(names) == 2
    state.active, state.context_mask = True, _mask()
    _assert_runs_close(_run(model, embeds), dense)
    assert state.layer_sparsity == {name: 0.0 for name in names}
    assert state.skipped_flops == 0


def _reference(mlp: nn.Module, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The dense MLP with the intermediate channels outside ``idx`` zeroed at the gate/up outputs."""
    keep = torch.zeros(INTERMEDIATE)
    keep[idx] = 1.0
    return mlp.down_proj(mlp.act_fn(mlp.gate_proj(x) * keep) * (mlp.up_proj(x) * keep))


@pytest.mark.parametrize("sparse_output_tokens", [False, True])
def test_oracle_half_matches_masked_dense(sparse_output_tokens: bool) -> None:
    model = _model()
    name, mlp = _mlps(model)[1]
    state = SparsityState(active=True, context_mask=_mask(), sparse_output_tokens=sparse_output_tokens)
    wrapper = SparseGatedMLP(mlp, state, build_estimator("oracle", gated_mlp_block(mlp), name), 32, name)
    x0 = torch.randn(2, 6, HIDDEN)
    grad_out = torch.randn(2, 6, HIDDEN)
    idx = OracleEstimator()
    idx.prepare(gated_mlp_block(mlp))
    idx = idx.select(x0, 32, context_mask=state.context_mask)
    assert idx.numel() == 32

    def grads(fn) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        mlp.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_(True)
        out = fn(x)
        (out * grad_out).sum().backward()
        return out.detach(), x.grad, {n: p.grad.clone() for n, p in _lora_params(mlp).items()}

    def reference(x: torch.Tensor) -> torch.Tensor:
        sparse = _reference(mlp, x, idx)
        if sparse_output_tokens:
            return sparse
        return torch.where(state.context_mask[..., None], sparse, mlp(x))

    got = grads(wrapper)
    _assert_runs_close(got, grads(reference), atol=1e-6)
    assert len(got[2]) == 6  # lora_A and lora_B of gate, up and down all get gradients
    if not sparse_output_tokens:
        # Output tokens run through the original module itself: bit-identical to it on those rows
        # (the whole batch at once may round differently, as BLAS blocks by row count).
        output_tokens = ~state.context_mask
        torch.testing.assert_close(got[0][output_tokens], mlp(x0[output_tokens]).detach(), atol=0, rtol=0)
        dense = mlp(x0).detach()
        torch.testing.assert_close(got[0][output_tokens], dense[output_tokens], atol=1e-6, rtol=1e-5)
        assert not torch.allclose(got[0][state.context_mask], dense[state.context_mask], atol=1e-4)


def test_inactive_is_bit_identical_and_unwrap_restores() -> None:
    model = _model()
    embeds = torch.randn(2, 6, HIDDEN)
    keys = list(model.state_dict())
    originals = [mlp for _, mlp in _mlps(model)]
    with torch.no_grad():
        before = model(inputs_embeds=embeds).logits
    state = SparsityState()
    names = wrap_gated_mlps(model, state, "svd", [0.0, 0.75], _mlps(model), rank=4)
    assert names == ["model.layers.1.mlp"]
    assert isinstance(model.model.layers[1].mlp, SparseGatedMLP)
    assert model.model.layers[0].mlp is originals[0]
    assert list(model.state_dict()) == keys  # wrapping keeps every parameter name
    with torch.no_grad():
        assert torch.equal(model(inputs_embeds=embeds).logits, before)
        state.active = True  # no mask yet: still dense
        assert torch.equal(model(inputs_embeds=embeds).logits, before)
        state.context_mask = _mask()
        assert not torch.allclose(model(inputs_embeds=embeds).logits, before)
    assert unwrap_all(model) == names
    assert [mlp for _, mlp in _mlps(model)] == originals
    assert list(model.state_dict()) == keys
    with torch.no_grad():
        assert torch.equal(model(inputs_embeds=embeds).logits, before)


def test_skipped_flops_and_sparsity_recorded() -> None:
    model = _model()
    state = SparsityState(active=True, context_mask=_mask())
    names = wrap_gated_mlps(model, state, "svd", [0.5, 0.75], _mlps(model), rank=4)
    context = int(state.context_mask.sum())
    output = state.context_mask.numel() - context

    def predicted(kept: int) -> int:
        return mlp_flops(HIDDEN, INTERMEDIATE, context_tokens=context, output_tokens=output, kept=kept).skipped

    model(inputs_embeds=torch.randn(2, 6, HIDDEN)).logits.sum().backward()
    assert state.skipped_flops > 0
    assert state.skipped_flops == predicted(32) + predicted(16)
    assert state.layer_sparsity == {names[0]: 0.5, names[1]: 0.75}
    state.reset()
    assert state.skipped_flops == 0 and state.layer_sparsity == {}
    with torch.no_grad():  # no backward will run: only the forward is skipped
        model(inputs_embeds=torch.randn(2, 6, HIDDEN))
    assert state.skipped_flops == (predicted(32) + predicted(16)) / 2


def test_lora_injected_after_wrapping_is_used() -> None:
    model = _model(lora=False)
    state = SparsityState(active=True, context_mask=_mask())
    wrap_gated_mlps(model, state, "oracle", [0.5, 0.5], _mlps(model))
    inject_lora(model, LoRAConfig(r=4, target_modules=["gate_proj", "up_proj", "down_proj"]))
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(0, 0.1)
    model(inputs_embeds=torch.randn(2, 6, HIDDEN)).logits.sum().backward()
    assert all(p.grad is not None for p in _lora_params(model).values())
    unwrap_all(model)
    assert set(lora_layers(model)) == {f"model.layers.{i}.mlp.{p}" for i in range(2)
                                       for p in ("gate_proj", "up_proj", "down_proj")}


def _structure(model: nn.Module) -> list[tuple[str, type]]:
    return [(name, type(module)) for name, module in model.named_modules()]


def test_bad_input_raises_and_leaves_model_unchanged() -> None:
    model = _model()
    structure = _structure(model)
    mlps = _mlps(model)
    state = SparsityState()
    cases = [
        ([0.5, 1.0], mlps, ValueError, "Sparsity"),
        ([0.5, 0.5], [mlps[0], ("model.layers.1.self_attn", model.model.layers[1].self_attn)], TypeError,
         "not a gated"),
        ([0.5, 0.5], [mlps[0], ("model.layers.1.mlp", mlps[0][1])], ValueError, "not the module passed"),
        ([0.5, 0.5], [mlps[0], mlps[0]], ValueError, "unique"),
        ([0.5], mlps, ValueError, "one per MLP"),
    ]
    for sparsity, layers, error, match in cases:
        with pytest.raises(error, match=match):
            wrap_gated_mlps(model, state, "svd", sparsity, layers, rank=4)
        assert _structure(model) == structure
    name, mlp = mlps[0]
    estimator = build_estimator("norm", gated_mlp_block(mlp), name)
    for keep in (0, INTERMEDIATE + 1):
        with pytest.raises(ValueError, match="keep must be an integer"):
            SparseGatedMLP(mlp, state, estimator, keep, name)
    trainable = _model(lora=False).requires_grad_(True)
    with pytest.raises(ValueError, match="requires grad"):
        wrap_gated_mlps(trainable, state, "norm", [0.5, 0.5], _mlps(trainable))
    merge_adapter(model)
    with pytest.raises(ValueError, match="merged LoRA"):
        wrap_gated_mlps(model, state, "svd", [0.5, 0.5], mlps, rank=4)
    assert _structure(model) == structure


def test_merged_after_wrapping_raises_on_sparse_forward() -> None:
    model = _model()
    state = SparsityState(active=True, context_mask=_mask())
    wrap_gated_mlps(model, state, "norm", [0.5, 0.5], _mlps(model))
    merge_adapter(model)
    with pytest.raises(ValueError, match="merged LoRA"):
        model(inputs_embeds=torch.randn(2, 6, HIDDEN))
    state.context_mask = torch.ones(2, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match="context_mask"):
        model(inputs_embeds=torch.randn(2, 6, HIDDEN))


def test_gpt2_plain_mlp_matches_masked_dense() -> None:
    """Conv1D (transposed) weights, an fc2 bias, LoRA on c_fc and c_proj."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=64)).eval()
    inject_lora(model, LoRAConfig(r=4, target_modules=["c_fc", "c_proj"]))
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(0, 0.1)
    mlps = [(f"transformer.h.{i}.mlp", block.mlp) for i, block in enumerate(model.transformer.h)]
    keys = list(model.state_dict())
    mask = _mask()
    state = SparsityState(active=True, context_mask=mask)
    with pytest.raises(TypeError, match="not a plain"):
        wrap_plain_mlps(model, state, "oracle", [0.5], [("transformer.h.0.attn", model.transformer.h[0].attn)])
    names = wrap_plain_mlps(model, state, "oracle", [0.5, 0.5], mlps)
    assert list(model.state_dict()) == keys
    name, mlp = mlps[1]
    wrapper = model.get_submodule(name)
    assert isinstance(wrapper, SparsePlainMLP)
    x0 = torch.randn(2, 6, HIDDEN)
    idx = wrapper.estimator.select(x0, wrapper.keep, context_mask=mask)
    assert idx.numel() == 4 * HIDDEN // 2

    def grads(fn) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        mlp.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_(True)
        out = fn(x)
        out.square().sum().backward()
        return out.detach(), x.grad, {n: p.grad.clone() for n, p in _lora_params(mlp).items()}

    def reference(x: torch.Tensor) -> torch.Tensor:
        keep = torch.zeros(4 * HIDDEN)
        keep[idx] = 1.0
        sparse = mlp.c_proj(mlp.act(mlp.c_fc(x)) * keep)
        return torch.where(mask[..., None], sparse, mlp(x))

    state.reset()
    _assert_runs_close(grads(wrapper), grads(reference))
    context = int(mask.sum())
    expected = mlp_flops(HIDDEN, 4 * HIDDEN, context_tokens=context, output_tokens=mask.numel() - context,
                         kept=idx.numel(), gated=False).skipped
    assert state.skipped_flops == expected and state.layer_sparsity == {name: 0.5}
    assert unwrap_all(model) == names and list(model.state_dict()) == keys
