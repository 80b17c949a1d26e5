"""Sparse attention hooks on tiny random LLaMA (grouped-query: 4 heads, 2 kv heads) and Qwen2 (q/k/v
biases): exact against a hand-built reference (the original attention with the unselected channels
zeroed by hooks), dense where they must be, FLOPs accounting, clean hooking and unhooking."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from lightning_sft import LoRAConfig, inject_lora, lora_layers, merge_adapter
from lightning_sft.sparsity import (
    OracleEstimator,
    QKBlock,
    SparsityState,
    VBlock,
    attention_indices,
    SparseFlops,
    attention_projection_flops,
    unwrap_attention,
    wrap_attention,
)

HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 32, 4, 2, 8
KV = KV_HEADS * HEAD_DIM


def _model(family: str = "llama", lora: bool = True, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    kwargs = dict(
        vocab_size=128, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=64,
    )
    model = (LlamaForCausalLM(LlamaConfig(**kwargs)) if family == "llama" else Qwen2ForCausalLM(Qwen2Config(**kwargs)))
    model.eval().requires_grad_(False)
    if lora:
        _inject(model)
    return model


def _inject(model: nn.Module, seed: int = 3) -> None:
    torch.manual_seed(seed)
    inject_lora(model, LoRAConfig(r=4))
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(0, 0.1)


def _attentions(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(f"model.layers.{i}.self_attn", layer.self_attn) for i, layer in enumerate(model.model.layers)]


def _mask(seed: int = 1, shape: tuple[int, int] = (2, 6)) -> torch.Tensor:
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < 0.6
    mask[:, 0], mask[:, -1] = True, False  # both kinds of token in every sample
    return mask


def _run(model: nn.Module, embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Logits, input gradient and LoRA gradients of one forward/backward."""
    model.zero_grad(set_to_none=True)
    x = embeds.clone().requires_grad_(True)
    logits = model(inputs_embeds=x).logits
    logits.square().mean().backward()
    lora = {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n and p.grad is not None}
    return logits.detach(), x.grad, lora


def _assert_runs_close(a, b, atol: float = 1e-6) -> None:
    torch.testing.assert_close(a[0], b[0], atol=atol, rtol=1e-5)
    torch.testing.assert_close(a[1], b[1], atol=atol, rtol=1e-5)
    assert a[2].keys() == b[2].keys()
    for name in a[2]:
        torch.testing.assert_close(a[2][name], b[2][name], atol=atol, rtol=1e-5, msg=name)


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def _structure(model: nn.Module) -> list[tuple[str, type]]:
    return [(name, type(module)) for name, module in model.named_modules()]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_keep_all_equals_dense(family: str) -> None:
    model = _model(family)
    embeds = torch.randn(2, 6, HIDDEN)
    dense = _run(model, embeds)
    state = SparsityState(active=True, context_mask=_mask())
    assert wrap_attention(model, state, "none", [0.5, 0.5], _attentions(model)) == [n for n, _ in _attentions(model)]
    sparse = _run(model, embeds)
    _assert_runs_close(sparse, dense)
    assert len(sparse[2]) == 28  # A and B of the 7 projections of both layers
    assert state.skipped_flops == 0
    assert set(state.layer_sparsity.values()) == {0.0}


def _base(layer: nn.Module) -> nn.Module:
    return getattr(layer, "base_layer", layer)


def _reference_hooks(model: nn.Module, mask: torch.Tensor, keep: int, sparse_output_tokens: bool) -> dict:
    """Zero the unselected q/k/v output and o_proj input channels of the context tokens of the
    original modules; the indices come from an independent oracle on each attention input."""
    chosen: dict[str, torch.Tensor] = {}
    rows = torch.ones_like(mask) if sparse_output_tokens else mask

    def keep_mask(idx: torch.Tensor, width: int) -> torch.Tensor:
        channels = torch.zeros(width, dtype=torch.bool)
        channels[idx] = True
        return ~(rows[..., None] & ~channels)  # (B, S, width): False = zeroed

    for name, attention in _attentions(model):
        q, k, v = (_base(getattr(attention, p)) for p in ("q_proj", "k_proj", "v_proj"))
        qk = OracleEstimator()
        qk.prepare(QKBlock(q.weight, k.weight, HEADS, KV_HEADS, q.bias, k.bias, balanced=True, rotary_pairs=True))
        ve = OracleEstimator()
        ve.prepare(VBlock(v.weight, KV_HEADS, v.bias))

        def select(module, args, kwargs, name=name, qk=qk, ve=ve) -> None:
            x = kwargs["hidden_states"]
            idx = attention_indices(qk.select(x, keep, mask), ve.select(x, keep, mask), HEADS, KV_HEADS, HEAD_DIM)
            chosen[name] = idx

        attention.register_forward_pre_hook(select, with_kwargs=True)
        for proj in ("q", "k", "v"):
            getattr(attention, f"{proj}_proj").register_forward_hook(
                lambda m, a, out, name=name, proj=proj: out * keep_mask(getattr(chosen[name], proj), out.shape[-1])
            )
        attention.o_proj.register_forward_pre_hook(
            lambda m, a, name=name: (a[0] * keep_mask(chosen[name].o, a[0].shape[-1]),)
        )
    return chosen


@pytest.mark.parametrize("family,sparse_output_tokens", [("llama", False), ("qwen2", False), ("llama", True)])
def test_oracle_half_matches_zeroed_dense_reference(family: str, sparse_output_tokens: bool) -> None:
    model = _model(family)
    reference = copy.deepcopy(model)
    embeds = torch.randn(2, 6, HIDDEN)
    dense = _run(model, embeds)
    mask = _mask()
    chosen = _reference_hooks(reference, mask, KV // 2, sparse_output_tokens)
    state = SparsityState(active=True, context_mask=mask, sparse_output_tokens=sparse_output_tokens)
    wrap_attention(model, state, "oracle", [0.5, 0.5], _attentions(model))
    got = _run(model, embeds)
    _assert_runs_close(got, _run(reference, embeds), atol=2e-6)
    assert len(got[2]) == 28 and all(g.abs().sum() > 0 for g in got[2].values())
    assert not torch.allclose(got[0], dense[0], atol=1e-4)  # the sparsity did change the result
    assert all(idx.k.numel() == KV // 2 and idx.q.numel() == HEADS * HEAD_DIM // 2 for idx in chosen.values())


def test_gqa_indices_and_zero_pattern() -> None:
    """Context tokens: k keeps 8 of 16 kv channels (4 per kv head, RoPE pairs together), q keeps
    exactly those dims in both query heads of each group; output tokens stay dense."""
    model = _model()
    mask = _mask()
    state = SparsityState(active=True, context_mask=mask)
    wrap_attention(model, state, "oracle", [0.5, 0.5], _attentions(model))
    attention = model.model.layers[1].self_attn
    seen: dict[str, torch.Tensor] = {}
    for proj in ("q_proj", "k_proj", "v_proj"):
        getattr(attention, proj).register_forward_hook(lambda m, a, out, proj=proj: seen.__setitem__(proj, out))
    model(inputs_embeds=torch.randn(2, 6, HIDDEN))
    kept = {proj: out[mask].ne(0) for proj, out in seen.items()}
    for proj, channels in kept.items():  # one channel set for every context token of the batch
        assert (channels == channels[0]).all(), proj
        assert seen[proj][~mask].ne(0).all(), proj
    k_idx = kept["k_proj"][0].nonzero().squeeze(1)
    q_idx = kept["q_proj"][0].nonzero().squeeze(1)
    assert k_idx.numel() == 8 and kept["v_proj"][0].sum() == 8
    assert [int(((k_idx // HEAD_DIM) == g).sum()) for g in range(KV_HEADS)] == [4, 4]
    for c in k_idx.tolist():  # the RoPE partner of every kept dim is kept
        g, d = divmod(c, HEAD_DIM)
        assert g * HEAD_DIM + (d + HEAD_DIM // 2) % HEAD_DIM in k_idx.tolist()
    group = HEADS // KV_HEADS
    expected_q = sorted(
        h * HEAD_DIM + d
        for g, d in (divmod(c, HEAD_DIM) for c in k_idx.tolist())
        for h in range(g * group, (g + 1) * group)
    )
    assert q_idx.tolist() == expected_q
    first, last = k_idx[0].item(), k_idx[-1].item()  # explicit: kv head 0 -> q heads 0, 1; kv head 1 -> q heads 2, 3
    assert first < HEAD_DIM and {first, HEAD_DIM + first} <= set(q_idx.tolist())
    assert last >= HEAD_DIM and {HEAD_DIM + last, 2 * HEAD_DIM + last} <= set(q_idx.tolist())


def test_inactive_is_bit_identical_and_unwrap_restores() -> None:
    model = _model()
    embeds = torch.randn(2, 6, HIDDEN)
    with torch.no_grad():
        dense = model(inputs_embeds=embeds).logits
    keys, structure = list(model.state_dict()), _structure(model)
    assert _hook_count(model) == 0
    state = SparsityState(active=False, context_mask=_mask())
    wrap_attention(model, state, "svd", [0.0, 0.5], _attentions(model), rank=4)
    assert list(model.state_dict()) == keys and _structure(model) == structure
    assert len(lora_layers(model)) == 14  # the LoRA projections stay visible (adapter saving, merging)
    cases = [(False, _mask()), (True, None), (True, torch.zeros(2, 6, dtype=torch.bool))]
    for active, mask in cases:
        state.active, state.context_mask = active, mask
        with torch.no_grad():
            torch.testing.assert_close(model(inputs_embeds=embeds).logits, dense, atol=0, rtol=0)
    state.active, state.context_mask = True, _mask()
    with torch.no_grad():
        assert not torch.equal(model(inputs_embeds=embeds).logits, dense)
    assert list(state.layer_sparsity) == ["model.layers.1.self_attn.qk", "model.layers.1.self_attn.v"]
    assert unwrap_attention(model) == ["model.layers.1.self_attn"]
    assert _hook_count(model) == 0 and list(model.state_dict()) == keys and _structure(model) == structure
    with torch.no_grad():
        torch.testing.assert_close(model(inputs_embeds=embeds).logits, dense, atol=0, rtol=0)
    assert unwrap_attention(model) == []


def test_skipped_flops_and_sparsity_recorded() -> None:
    model = _model()
    mask = _mask()
    state = SparsityState(active=True, context_mask=mask)
    wrap_attention(model, state, "norm", [0.5, 0.75], _attentions(model))
    context, output = int(mask.sum()), int((~mask).sum())

    def predicted(kept_qk: int, kept_v: int) -> SparseFlops:
        return attention_projection_flops(
            HIDDEN, HEADS, KV_HEADS, HEAD_DIM, context_tokens=context, output_tokens=output,
            kept_qk=kept_qk, kept_v=kept_v,
        )

    layers = [predicted(8, 8), predicted(4, 4)]  # 0.75: 16 * 0.25 = 4 kv channels, a multiple of 2 * 2
    _run(model, torch.randn(2, 6, HIDDEN))
    assert state.skipped_flops == sum(f.skipped for f in layers)
    assert state.layer_sparsity == {
        "model.layers.0.self_attn.qk": 0.5, "model.layers.0.self_attn.v": 0.5,
        "model.layers.1.self_attn.qk": 0.75, "model.layers.1.self_attn.v": 0.75,
    }
    state.reset()
    with torch.no_grad():
        model(inputs_embeds=torch.randn(2, 6, HIDDEN))
    assert state.skipped_flops == sum(f.dense_forward - f.sparse_forward for f in layers)


def test_lora_injected_after_wrapping_is_used() -> None:
    late, early = _model(lora=False), _model(lora=True)
    for model in (late, early):
        state = SparsityState(active=True, context_mask=_mask())
        wrap_attention(model, state, "oracle", [0.5, 0.5], _attentions(model))
    _inject(late)
    embeds = torch.randn(2, 6, HIDDEN)
    _assert_runs_close(_run(late, embeds), _run(early, embeds))
    base = late.model.layers[0].self_attn.q_proj.base_layer
    assert not base._forward_pre_hooks and not base._forward_hooks  # the hooks moved to the LoRA layer
    unwrap_attention(late)
    assert _hook_count(late) == 0


class _NoConfigAttention(nn.Module):
    def __init__(self, attention: nn.Module) -> None:
        super().__init__()
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            self.add_module(name, getattr(attention, name))


def test_bad_input_raises_and_leaves_model_unchanged() -> None:
    model = _model()
    structure = _structure(model)
    attentions = _attentions(model)
    state = SparsityState()
    mlp = ("model.layers.1.mlp", model.model.layers[1].mlp)
    cases = [
        ([0.5, 1.0], attentions, ValueError, "parsity"),
        ([0.5, -0.1], attentions, ValueError, "parsity"),
        ([0.5, 0.5], [attentions[0], mlp], TypeError, "lacks q_proj, k_proj, v_proj, o_proj"),
        ([0.5], [("model.layers.0.self_attn", attentions[1][1])], ValueError, "not the module"),
        ([0.5, 0.5], [attentions[0], attentions[0]], ValueError, "unique"),
        ([0.5], attentions, ValueError, "one per module"),
        ([0.5, 0.5], attentions, ValueError, "Unknown channel-selection strategy"),
    ]
    for sparsity, layers, error, match in cases:
        strategy = "nope" if "strategy" in match else "svd"
        with pytest.raises(error, match=match):
            wrap_attention(model, state, strategy, sparsity, layers, rank=4)
        assert _structure(model) == structure and _hook_count(model) == 0
    bare = nn.Module()
    bare.attn = _NoConfigAttention(model.model.layers[0].self_attn)
    with pytest.raises(TypeError, match="num_attention_heads"):
        wrap_attention(bare, state, "norm", [0.5], [("attn", bare.attn)])
    model.model.layers[1].self_attn.config.num_key_value_heads = 4  # config disagrees with the weights
    with pytest.raises(ValueError, match="do not match the config"):
        wrap_attention(model, state, "norm", [0.5, 0.5], attentions)
    model.model.layers[1].self_attn.config.num_key_value_heads = KV_HEADS
    assert _hook_count(model) == 0
    trainable = _model(lora=False).requires_grad_(True)
    with pytest.raises(ValueError, match="requires grad"):
        wrap_attention(trainable, state, "norm", [0.5, 0.5], _attentions(trainable))
    wrap_attention(model, state, "norm", [0.5, 0.5], attentions)
    hooks = _hook_count(model)
    with pytest.raises(ValueError, match="already has sparse attention hooks"):
        wrap_attention(model, state, "norm", [0.5, 0.5], attentions)
    assert _hook_count(model) == hooks
    unwrap_attention(model)
    merge_adapter(model)
    with pytest.raises(ValueError, match="merged LoRA"):
        wrap_attention(model, state, "svd", [0.5, 0.5], attentions, rank=4)
    assert _structure(model) == structure and _hook_count(model) == 0


def test_merged_or_bad_mask_raises_on_sparse_forward() -> None:
    model = _model()
    state = SparsityState(active=True, context_mask=_mask())
    wrap_attention(model, state, "norm", [0.5, 0.5], _attentions(model))
    state.context_mask = torch.ones(2, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match="context_mask"):
        model(inputs_embeds=torch.randn(2, 6, HIDDEN))
    state.context_mask = _mask()
    merge_adapter(model)
    with pytest.raises(ValueError, match="merged LoRA"):
        model(inputs_embeds=torch.randn(2, 6, HIDDEN))
