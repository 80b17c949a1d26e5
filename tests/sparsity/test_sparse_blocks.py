"""SparseBlock beyond the family-wide checks of test_sparse_families.py: inactive is bit-identical and
desparsify restores; batches with no dense token (sparse output tokens, context only); skipped FLOPs
equal the ``mlp_flops`` / ``attention_projection_flops`` predictions and the measured drop;
``dropped_output``; grouped-query index maps; StarCoder2's functional dropout; LoRA injected after
sparsify; the refusals (bad input leaves the model unchanged, a sparse forward that cannot be
computed right raises); and keep-all == dense through the Trainer for GPT-NeoX and BERT."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from family_models import FAMILIES, FamilyModule, SparsityRecorder, build, token_batches
from lightning_sft import ContextualSparsity, LoRA, LoRAConfig, inject_lora, lora_layers, merge_adapter, unmerge_adapter
from lightning_sft.anatomy.linear import linear_features
from lightning_sft.anatomy import BlockAnatomy, describe
from lightning_sft.sparsity import (
    SparseBlock,
    SparseFlops,
    SparsityState,
    attention_indices,
    attention_projection_flops,
    desparsify,
    mlp_flops,
    sparse_blocks,
    sparsify,
)
from test_sparse_families import _assert_close, _run, _zero_dropped, record_choices

HIDDEN, INTERMEDIATE = 32, 64
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 8
KV = KV_HEADS * HEAD_DIM
LLAMA = "LLaMA"


def _model(family: str = LLAMA, lora: bool = True, seed: int = 0) -> nn.Module:
    """A tiny random model of ``family`` (family_models), frozen, with LoRA on every linear layer."""
    model = build(family, seed).requires_grad_(False)
    if lora:
        inject_lora(model, LoRAConfig(r=4, target_modules="all-linear"))
        with torch.no_grad():
            for layer in lora_layers(model).values():
                layer.lora_B.normal_(0, 0.1)
    return model


def _mask(seed: int = 1, shape: tuple[int, int] = (2, 6)) -> torch.Tensor:
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < 0.6
    mask[:, 0], mask[:, -1] = True, False  # both kinds of token in every sample
    return mask


def _output(model: nn.Module, embeds: torch.Tensor) -> torch.Tensor:
    out = model(inputs_embeds=embeds)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _structure(model: nn.Module) -> list[tuple[str, type]]:
    return [(name, type(module)) for name, module in model.named_modules()]


def _overridden(model: nn.Module) -> list[str]:
    """Modules with an instance-level forward (what a sparse block installs)."""
    return [name for name, module in model.named_modules() if "forward" in module.__dict__]


def _untouched(model: nn.Module) -> bool:
    return not sparse_blocks(model) and not _overridden(model)


def _blocks(model: nn.Module) -> list[BlockAnatomy]:
    anatomy = describe(model)
    return anatomy.mlps + anatomy.attentions


def _predicted(block: SparseBlock, context: int, output: int) -> SparseFlops:
    """What ``lightning_sft.sparsity`` predicts a block skips for these token counts."""
    anatomy = block.anatomy
    if anatomy.kind == "mlp":
        return mlp_flops(anatomy.hidden, anatomy.intermediate, context_tokens=context, output_tokens=output,
                         kept=block.keep["mlp"], gated=anatomy.gated)
    return attention_projection_flops(anatomy.hidden, *anatomy.heads, context_tokens=context, output_tokens=output,
                                      kept_qk=block.keep["qk"], kept_v=block.keep["v"])


# -- dense where it must be, and clean removal -------------------------------------------------------


def test_inactive_is_bit_identical_and_desparsify_restores() -> None:
    model = _model()
    embeds = torch.randn(2, 6, HIDDEN)
    with torch.no_grad():
        dense = _output(model, embeds)
    keys, structure, adapted = list(model.state_dict()), _structure(model), set(lora_layers(model))
    anatomy = describe(model)
    state = SparsityState()
    installed = sparsify(model, anatomy.mlps, [0.0, 0.75], state, "svd", rank=4)
    installed += sparsify(model, anatomy.attentions, [0.0, 0.5], state, "svd", rank=4)
    # sparsity 0 leaves a block alone: nothing is installed on layer 0
    assert [b.name for b in installed] == ["model.layers.1.mlp", "model.layers.1.self_attn"]
    assert [b.name for b in sparse_blocks(model)] == ["model.layers.1.self_attn", "model.layers.1.mlp"]
    assert not any(name.startswith("model.layers.0.") for name in _overridden(model))
    assert "forward" in model.model.layers[1].mlp.__dict__  # a compact MLP: its own forward is replaced too
    # nothing in the module tree changes: parameter names, state-dict keys and the LoRA layers stay
    assert list(model.state_dict()) == keys and _structure(model) == structure and set(lora_layers(model)) == adapted
    assert len(adapted) == 14
    for active, mask in [(False, None), (False, _mask()), (True, None), (True, torch.zeros(2, 6, dtype=torch.bool))]:
        state.active, state.context_mask = active, mask
        with torch.no_grad():
            torch.testing.assert_close(_output(model, embeds), dense, atol=0, rtol=0)
    assert state.skipped_flops == 0 and state.layer_sparsity == {}
    state.active, state.context_mask = True, _mask()
    with torch.no_grad():
        assert not torch.allclose(_output(model, embeds), dense, atol=1e-4)
    assert state.layer_sparsity == {
        "model.layers.1.mlp": 0.75, "model.layers.1.self_attn.qk": 0.5, "model.layers.1.self_attn.v": 0.5,
    }
    assert desparsify(model) == ["model.layers.1.self_attn", "model.layers.1.mlp"]
    assert _untouched(model)
    assert list(model.state_dict()) == keys and _structure(model) == structure and set(lora_layers(model)) == adapted
    with torch.no_grad():  # the mask is still set and active: but nothing is sparse any more
        torch.testing.assert_close(_output(model, embeds), dense, atol=0, rtol=0)
    assert desparsify(model) == []


# -- the sparse computation --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["sparse_output_tokens", "context only"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_token_sparse_matches_dense_with_every_tokens_dropped_channels_zeroed(family: str, mode: str) -> None:
    """No token left to run dense: ``sparse_output_tokens`` (the channels are still chosen from the
    context tokens only), or a batch of context tokens only (``token_mask_fn`` marking all).
    ``test_sparse_families`` checks the usual case, output tokens dense."""
    model = _model(family)
    embeds = torch.randn(2, 6, HIDDEN)
    mask = _mask() if mode == "sparse_output_tokens" else torch.ones(2, 6, dtype=torch.bool)
    state = SparsityState(active=True, context_mask=mask, sparse_output_tokens=mode == "sparse_output_tokens")
    blocks = _blocks(model)
    installed = sparsify(model, blocks, [0.5] * len(blocks), state, "oracle")
    masks_seen = []
    for block in installed:
        for name, estimator in block.estimators.items():
            def spy(x, k, context_mask=None, _select=estimator.select):
                masks_seen.append(context_mask)
                return _select(x, k, context_mask=context_mask)
            estimator.select = spy
    chosen = record_choices(installed)
    sparse = _run(model, embeds)
    assert masks_seen and all(torch.equal(seen.cpu(), mask) for seen in masks_seen)
    assert set(chosen) == {b.name for b in installed}
    tokens = mask.numel()
    predicted = sum(_predicted(b, tokens, 0).skipped for b in installed)
    assert state.skipped_flops == predicted
    desparsify(model)
    handles = _zero_dropped(model, blocks, chosen, torch.ones_like(mask))
    reference = _run(model, embeds)
    for handle in handles:
        handle.remove()
    _assert_close(sparse, reference)


def test_compact_mlp_runs_output_tokens_through_the_module_itself() -> None:
    """Output tokens go through the MLP's own forward, bit-identical to it on those rows; the
    context rows differ from dense; every LoRA factor of gate, up and down gets a gradient."""
    model = _model()
    mlp = model.model.layers[1].mlp
    mask = _mask()
    state = SparsityState(active=True, context_mask=mask)
    (block,) = sparsify(model, describe(model).mlps[1:], [0.5], state, "oracle")
    assert block.region is mlp and block.keep == {"mlp": INTERMEDIATE // 2}
    x = torch.randn(2, 6, HIDDEN, requires_grad=True)
    got = mlp(x)
    got.square().sum().backward()
    lora = {n: p.grad for n, p in mlp.named_parameters() if "lora_" in n}
    assert len(lora) == 6 and all(g is not None and g.abs().sum() > 0 for g in lora.values())
    state.active, state.context_mask = False, None
    with torch.no_grad():
        alone = mlp(x.detach()[~mask])
        dense = mlp(x.detach())
    torch.testing.assert_close(got.detach()[~mask], alone, atol=0, rtol=0)
    torch.testing.assert_close(got.detach()[~mask], dense[~mask], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(got.detach()[mask], dense[mask], atol=1e-4)
    assert state.layer_sparsity == {"model.layers.1.mlp": 0.5}


def test_gqa_indices_and_zero_pattern() -> None:
    """Context tokens: k keeps 8 of 16 kv channels (4 per kv head, RoPE pairs together), q keeps
    exactly those dims in both query heads of each group; output tokens stay dense. The anatomy's
    slices map kv channels to the rows ``attention_indices`` gives for the separate layout."""
    model = _model()
    mask = _mask()
    state = SparsityState(active=True, context_mask=mask)
    anatomy = describe(model)
    installed = sparsify(model, anatomy.attentions, [0.5, 0.5], state, "oracle")
    chosen = record_choices(installed)
    attention = model.model.layers[1].self_attn
    seen: dict[str, torch.Tensor] = {}
    handles = [getattr(attention, proj).register_forward_hook(lambda m, a, out, proj=proj: seen.__setitem__(proj, out))
               for proj in ("q_proj", "k_proj", "v_proj")]
    with torch.no_grad():
        model(inputs_embeds=torch.randn(2, 6, HIDDEN))
    for handle in handles:
        handle.remove()
    kept = {proj: out[mask].ne(0) for proj, out in seen.items()}
    for proj, channels in kept.items():  # one channel set for every context token of the batch
        assert (channels == channels[0]).all(), proj
        assert seen[proj][~mask].ne(0).all(), proj
    k_idx = kept["k_proj"][0].nonzero().squeeze(1)
    q_idx = kept["q_proj"][0].nonzero().squeeze(1)
    v_idx = kept["v_proj"][0].nonzero().squeeze(1)
    assert k_idx.numel() == 8 and v_idx.numel() == 8
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
    # what the estimators chose, through the anatomy's slices and through attention_indices
    qk, v = chosen["model.layers.1.self_attn"]["qk"], chosen["model.layers.1.self_attn"]["v"]
    assert torch.equal(qk, k_idx) and torch.equal(v, v_idx)
    block = anatomy.attentions[1]
    assert block.layout == "q/k/v/o_proj" and block.heads == (HEADS, KV_HEADS, HEAD_DIM)
    qk_group, v_group = block.groups
    (q_slice, k_slice), (v_slice,), (o_slice,) = qk_group.producers, v_group.producers, v_group.consumers
    assert q_slice.index.shape == (KV, group) and k_slice.index.shape == (KV, 1)
    indices = attention_indices(qk, v, HEADS, KV_HEADS, HEAD_DIM)
    assert torch.equal(q_slice.physical(qk).sort().values, indices.q) and torch.equal(indices.q, q_idx)
    assert torch.equal(k_slice.physical(qk), indices.k)
    assert torch.equal(v_slice.physical(v), indices.v)
    assert torch.equal(o_slice.physical(v).sort().values, indices.o)
    # every channel, one at a time: the GQA fan-out of each kv channel
    for c in range(KV):
        one = torch.tensor([c])
        g, d = divmod(c, HEAD_DIM)
        heads = [h * HEAD_DIM + d for h in range(g * group, (g + 1) * group)]
        assert q_slice.physical(one).tolist() == heads == o_slice.physical(one).tolist()
        assert torch.equal(q_slice.physical(one).sort().values, attention_indices(one, one, HEADS, KV_HEADS, HEAD_DIM).q)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_projection_row_and_column_belongs_to_one_channel(family: str) -> None:
    """Producer slices (all groups, all slices of a fused weight) cover each output row of a
    projection exactly once, consumer slices each input column: nothing is left dense or doubled."""
    model = _model(family, lora=False)
    for block in _blocks(model):
        rows: dict[str, list[torch.Tensor]] = {}
        cols: dict[str, list[torch.Tensor]] = {}
        for group in block.groups:
            everything = torch.arange(group.channels)
            for part in group.producers:
                rows.setdefault(part.path, []).append(part.physical(everything))
            for part in group.consumers:
                cols.setdefault(part.path, []).append(part.physical(everything))
        for table, side in ((rows, "out"), (cols, "in")):
            for path, parts in table.items():
                width = linear_features(model.get_submodule(path))[1 if side == "out" else 0]
                assert torch.equal(torch.cat(parts).sort().values, torch.arange(width)), (block.name, path)


# -- FLOPs -------------------------------------------------------------------------------------------


def test_mlp_skipped_flops_and_sparsity_recorded() -> None:
    model = _model()
    state = SparsityState(active=True, context_mask=_mask())
    names = [b.name for b in sparsify(model, describe(model).mlps, [0.5, 0.75], state, "svd", rank=4)]
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


def test_attention_skipped_flops_and_sparsity_recorded() -> None:
    model = _model()
    mask = _mask()
    state = SparsityState(active=True, context_mask=mask)
    sparsify(model, describe(model).attentions, [0.5, 0.75], state, "norm")
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


@pytest.mark.parametrize("family", list(FAMILIES))
def test_skipped_flops_equal_the_predictions_for_every_family(family: str) -> None:
    model = _model(family)
    mask = _mask()
    state = SparsityState(active=True, context_mask=mask)
    blocks = _blocks(model)
    installed = sparsify(model, blocks, [0.5] * len(blocks), state, "norm")
    context, output = int(mask.sum()), int((~mask).sum())
    layers = [_predicted(b, context, output) for b in installed]
    _run(model, torch.randn(2, 6, HIDDEN))
    assert state.skipped_flops == sum(f.skipped for f in layers) > 0
    expected_keys = {b.name for b in installed if b.anatomy.kind == "mlp"}
    expected_keys |= {f"{b.name}.{g}" for b in installed if b.anatomy.kind == "attention" for g in ("qk", "v")}
    assert set(state.layer_sparsity) == expected_keys
    state.reset()
    with torch.no_grad():
        _output(model, torch.randn(2, 6, HIDDEN))
    assert state.skipped_flops == sum(f.dense_forward - f.sparse_forward for f in layers)


@pytest.mark.parametrize("family,kinds,sparsity", [
    ("BERT", ("mlps",), 0.75),
    ("BERT", ("mlps", "attentions"), 0.5),
    (LLAMA, ("mlps", "attentions"), 0.5),
    ("GPT-2 (Conv1D, fused c_attn)", ("mlps", "attentions"), 0.5),
    ("Phi-3 (fused)", ("mlps", "attentions"), 0.5),
])
def test_measured_flops_fall_by_exactly_what_is_reported(family: str, kinds: tuple[str, ...], sparsity: float) -> None:
    """FlopCounterMode over forward and input-gradient backward: the products really are sliced (BERT's
    output.dense computes only the kept columns of the context rows), by what ``skipped_flops`` says."""
    model = _model(family, lora=False)
    embeds = torch.randn(2, 6, HIDDEN)
    mask = _mask()

    def measured() -> int:
        with FlopCounterMode(display=False) as counter:
            _output(model, embeds.clone().requires_grad_(True)).sum().backward()
        return counter.get_total_flops()

    dense = measured()
    state = SparsityState(active=True, context_mask=mask)
    anatomy = describe(model)
    blocks = [b for kind in kinds for b in getattr(anatomy, kind)]
    installed = sparsify(model, blocks, [sparsity] * len(blocks), state, "norm")  # static scores: no matmul
    sparse = measured()
    context = int(mask.sum())
    predicted = sum(_predicted(b, context, mask.numel() - context).skipped for b in installed)
    assert state.skipped_flops == predicted > 0
    assert dense - sparse == predicted


# -- calibration's error measure ---------------------------------------------------------------------


@pytest.mark.parametrize("family", [LLAMA, "BERT"])
def test_dropped_output_is_what_the_consumer_loses(family: str) -> None:
    """The consumer's product (LoRA included, no bias) with the dropped channels of the dense intermediate."""
    model = _model(family)
    installed = sparsify(model, describe(model).mlps, [0.5, 0.5], SparsityState(), "norm")
    block = installed[1]
    assert block.intermediate == INTERMEDIATE and block.estimator is block.estimators["mlp"]
    rows, idx = torch.randn(5, HIDDEN), torch.arange(0, INTERMEDIATE, 3)
    keep = torch.zeros(INTERMEDIATE)
    keep[idx] = 1.0
    with torch.no_grad():  # no mask: the modules' own forwards
        if family == LLAMA:
            mlp = model.model.layers[1].mlp
            h = mlp.act_fn(mlp.gate_proj(rows)) * mlp.up_proj(rows)
            consumer = mlp.down_proj
        else:
            layer = model.encoder.layer[1]
            h = layer.intermediate(rows)
            consumer = layer.output.dense
        expected = consumer(h) - consumer(h * keep)
    torch.testing.assert_close(block.dropped_output(rows, idx), expected, atol=1e-6, rtol=1e-5)


# -- the family's own code runs as is ----------------------------------------------------------------


def test_starcoder2_functional_dropout_follows_the_model_mode() -> None:
    torch.manual_seed(0)
    import transformers as tf
    config = tf.Starcoder2Config(vocab_size=128, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=64, residual_dropout=0.5)
    model = tf.Starcoder2ForCausalLM(config).requires_grad_(False).eval()
    state = SparsityState(active=True, context_mask=torch.ones(2, 6, dtype=torch.bool))
    anatomy = describe(model)
    assert anatomy.mlps[0].layout == "c_fc/c_proj" and anatomy.mlps[0].region == "model.layers.0.mlp"
    sparsify(model, anatomy.mlps, [0.5, 0.5], state, "norm")
    mlp = model.model.layers[0].mlp
    x = torch.randn(2, 6, HIDDEN)
    assert not mlp.training
    assert (mlp(x) == 0).float().mean() < 0.05
    assert state.layer_sparsity == {"model.layers.0.mlp": 0.5}  # it did run sparse
    model.train()
    assert mlp.training
    assert 0.3 < (mlp(x) == 0).float().mean() < 0.7
    model.eval()
    assert not mlp.training and (mlp(x) == 0).float().mean() < 0.05


# -- refusals ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mlps", "attentions"])
def test_merged_unfrozen_or_bad_mask_raises_on_sparse_forward(kind: str) -> None:
    model = _model()
    state = SparsityState(active=True, context_mask=_mask())
    sparsify(model, getattr(describe(model), kind), [0.5, 0.5], state, "norm")
    embeds = torch.randn(2, 6, HIDDEN)
    with torch.no_grad():
        sparse = _output(model, embeds)
    state.context_mask = _mask().float()
    with pytest.raises(ValueError, match="context_mask must be a bool"):
        _output(model, embeds)
    state.context_mask = torch.ones(2, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"does not hold the \(2, 5\) tokens of state.context_mask"):
        _output(model, embeds)
    state.context_mask = _mask()
    merge_adapter(model)
    with pytest.raises(ValueError, match="merged LoRA"):
        _output(model, embeds)
    unmerge_adapter(model)
    weight = model.model.layers[1].self_attn.v_proj.base_layer.weight if kind == "attentions" else \
        model.model.layers[1].mlp.down_proj.base_layer.weight
    weight.requires_grad_(True)
    with pytest.raises(ValueError, match="requires grad"):
        _output(model, embeds)
    weight.requires_grad_(False)
    with torch.no_grad():  # nothing was left half-done
        torch.testing.assert_close(_output(model, embeds), sparse, atol=1e-5, rtol=1e-4)


def test_bad_input_raises_and_leaves_model_unchanged() -> None:
    model = _model()
    structure, keys = _structure(model), list(model.state_dict())
    anatomy = describe(model)
    state = SparsityState()
    cases = [
        (anatomy.mlps, [0.5], "svd", r"1 sparsities for 2 blocks; pass one per block"),
        (anatomy.mlps, [0.5, 1.0], "svd", r"Sparsity for kept_channels must be a number in \[0, 1\)"),
        (anatomy.attentions, [0.5, -0.1], "svd", r"Sparsity for kept_channels must be a number in \[0, 1\)"),
        (anatomy.attentions, [0.5, 0.5], "nope", "Unknown channel-selection strategy 'nope'"),
        (anatomy.mlps + anatomy.attentions, [0.5, 0.5, 0.5], "norm", "3 sparsities for 4 blocks"),
    ]
    for blocks, sparsity, strategy, match in cases:
        with pytest.raises(ValueError, match=match):
            sparsify(model, blocks, sparsity, state, strategy, rank=4)
        assert _structure(model) == structure and _untouched(model)
    # a projection whose weight trains
    trainable = _model(lora=False).requires_grad_(True)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight requires grad"):
        sparsify(trainable, describe(trainable).mlps, [0.5, 0.5], state, "norm")
    assert _untouched(trainable)
    # an already-sparse model: the second call changes nothing
    installed = sparsify(model, anatomy.attentions, [0.5, 0.5], state, "norm")
    overridden = _overridden(model)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj is already sparse \(or passed twice\); desparsify\(model\)"):
        sparsify(model, anatomy.mlps + anatomy.attentions, [0.5] * 4, state, "norm")
    assert _overridden(model) == overridden and sparse_blocks(model) == installed
    assert desparsify(model) == [b.name for b in installed] and _untouched(model)
    # a merged adapter would be sparsified with the base
    merge_adapter(model)
    with pytest.raises(ValueError, match="merged LoRA layer.*unmerge_adapter"):
        sparsify(model, anatomy.attentions, [0.5, 0.5], state, "svd", rank=4)
    assert _structure(model) == structure and list(model.state_dict()) == keys and _untouched(model)


def test_a_block_passed_twice_is_refused_before_any_change() -> None:
    model = _model()
    mlps = describe(model).mlps
    with pytest.raises(ValueError, match="model.layers.0.mlp"):
        sparsify(model, [mlps[0], mlps[0]], [0.5, 0.5], SparsityState(), "norm")
    assert _untouched(model), f"left sparse: {[b.name for b in sparse_blocks(model)]}, {_overridden(model)}"


class _NoConfigAttention(nn.Module):
    def __init__(self, attention: nn.Module) -> None:
        super().__init__()
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            self.add_module(name, getattr(attention, name))


def test_describe_refuses_what_it_cannot_split() -> None:
    model = _model()
    bare = nn.Module()
    bare.attn = _NoConfigAttention(model.model.layers[0].self_attn)
    with pytest.raises(TypeError, match="attn has no config.num_attention_heads"):
        describe(bare)
    model.config.num_key_value_heads = 4  # the config disagrees with the weights
    with pytest.raises(ValueError, match="do not split as the config says"):
        describe(model)
    model.config.num_key_value_heads = KV_HEADS
    with pytest.raises(TypeError, match="no recognisable MLP or attention block.*MLP_LAYOUTS"):
        describe(nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 4)))
    bert = _model("BERT", lora=False)
    bert.config.chunk_size_feed_forward = 2
    with pytest.raises(ValueError, match="chunk_size_feed_forward = 2"):
        describe(bert)


def test_layers_that_only_look_like_mlps_are_not_taken_for_them() -> None:
    model = _model("GPT-NeoX (fused QKV)", lora=False)
    model.gpt_neox.layers[0].mlp.norm = nn.LayerNorm(INTERMEDIATE)  # something a compact run would skip
    anatomy = describe(model)
    assert [b.name for b in anatomy.mlps] == ["gpt_neox.layers.1.mlp"]
    assert [b.name for b in anatomy.attentions] == [f"gpt_neox.layers.{i}.attention" for i in range(2)]


def test_a_forward_that_does_not_call_each_projection_once_on_the_tokens_raises() -> None:
    """In place (BERT): a chunked feed-forward, or a producer run twice without its consumer."""
    model = _model("BERT", lora=False)
    state = SparsityState(active=True, context_mask=torch.ones(2, 6, dtype=torch.bool))
    sparsify(model, describe(model).mlps, [0.5, 0.5], state, "norm")
    embeds = torch.randn(2, 6, HIDDEN)
    with torch.no_grad():
        sparse = _output(model, embeds)
        model.encoder.layer[1].chunk_size_feed_forward = 2  # the layer's own setting (the config says 0)
        with pytest.raises(ValueError, match=r"intermediate\.dense was called on \(2, 2, 32\).*not in chunks"):
            _output(model, embeds)
        model.encoder.layer[1].chunk_size_feed_forward = 0
        layer = model.encoder.layer[0]
        layer.intermediate(embeds)
        with pytest.raises(RuntimeError, match=r"ran (only )?\['encoder\.layer\.0\.intermediate\.dense'\] sparse"):
            layer.intermediate(embeds.clone())
        # another sequence (as in cross-attention) through a sparse attention projection
        sparsify(model, describe(model).attentions, [0.5, 0.5], state, "norm")
        with pytest.raises(ValueError, match=r"does not hold the \(2, 6\) tokens of state.context_mask"):
            model.encoder.layer[0].attention.self.query(torch.randn(3, 5, HIDDEN))
        desparsify(model)
        sparsify(model, describe(model).mlps, [0.5, 0.5], state, "norm")
        torch.testing.assert_close(_output(model, embeds), sparse, atol=0, rtol=0)  # nothing was left half-done


def _inject(model: nn.Module) -> None:
    torch.manual_seed(3)
    inject_lora(model, LoRAConfig(r=4, target_modules="all-linear"))
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(0, 0.1)


@pytest.mark.parametrize("family,kind", [(LLAMA, "mlps"), (LLAMA, "attentions"), ("BERT", "mlps")])
def test_lora_injected_after_sparsify_is_used(family: str, kind: str) -> None:
    """A projection replaced since sparsify (LoRA injected later wraps it) is taken over at the next
    sparse forward: from the first forward on, the model computes what it computes with LoRA injected
    first, and desparsify hands every module back."""
    late, early = _model(family, lora=False), _model(family, lora=False)
    _inject(early)
    for model in (late, early):
        sparsify(model, getattr(describe(model), kind), [0.5, 0.5], SparsityState(active=True, context_mask=_mask()),
                 "oracle")
    _inject(late)
    adapted = set(lora_layers(late))
    assert adapted == set(lora_layers(early))
    embeds = torch.randn(2, 6, HIDDEN)
    for forward in ("first", "second"):
        got, expected = _run(late, embeds), _run(early, embeds)
        try:
            _assert_close(got, expected)
        except AssertionError as error:
            raise AssertionError(f"the {forward} forward after injecting LoRA differs: {error}") from None
    for path, layer in lora_layers(late).items():  # the forwards moved to the LoRA layers
        if any(path in b.modules for b in sparse_blocks(late)):
            assert "forward" in layer.__dict__ and "forward" not in layer.base_layer.__dict__, path
    assert sorted(desparsify(late)) == sorted(b.name for b in getattr(describe(late), kind))
    assert _untouched(late) and set(lora_layers(late)) == adapted


# -- found by structure, and through the Trainer -----------------------------------------------------


@pytest.mark.parametrize("family,mlps,attentions", [
    ("GPT-NeoX (fused QKV)", "gpt_neox.layers.{}.mlp", "gpt_neox.layers.{}.attention"),
    ("GPT-J", "transformer.h.{}.mlp", "transformer.h.{}.attn"),
    ("Phi", "model.layers.{}.mlp", "model.layers.{}.self_attn"),
    ("StarCoder2", "model.layers.{}.mlp", "model.layers.{}.self_attn"),
    ("GPT-2 (Conv1D, fused c_attn)", "transformer.h.{}.mlp", "transformer.h.{}.attn"),
    ("OPT", "model.decoder.layers.{}", "model.decoder.layers.{}.self_attn"),
    ("BERT", "encoder.layer.{}", "encoder.layer.{}.attention"),
])
def test_found_by_structure_in_depth_order(family: str, mlps: str, attentions: str) -> None:
    model = _model(family, lora=False)
    anatomy = describe(model)
    assert [b.name for b in anatomy.mlps] == [mlps.format(i) for i in range(2)]
    assert [b.name for b in anatomy.attentions] == [attentions.format(i) for i in range(2)]
    in_place = family in ("OPT", "BERT")  # the MLP is spread over the layer: no region to run compact
    assert all((b.region is None) == in_place for b in anatomy.mlps)
    assert all(b.region is None for b in anatomy.attentions)


def _fit(family: str, sparsity: ContextualSparsity | None) -> tuple[dict[str, torch.Tensor], SparsityRecorder | None]:
    pl.seed_everything(0)
    module = FamilyModule(family)
    recorder = SparsityRecorder(sparsity) if sparsity else None
    callbacks = [LoRA(r=4), *([sparsity, recorder] if sparsity else [])]
    trainer = pl.Trainer(max_steps=3, accelerator="cpu", callbacks=callbacks, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, torch.utils.data.DataLoader(token_batches(16), batch_size=4))
    assert _untouched(module)  # desparsified after fit
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}, recorder


def _all_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.ones_like(batch["input_ids"], dtype=torch.bool)


@pytest.mark.parametrize("family", ["GPT-NeoX (fused QKV)", "BERT"])
def test_fit_with_contextual_sparsity(family: str) -> None:
    """Keep-all trains as dense does, the oracle at 0.5 trains differently, and every MLP reports 0.5."""
    mask_fn = _all_tokens if family == "BERT" else None  # an encoder: the mask says which tokens are context
    options = dict(dense_layers=(), dense_warmup=0, calibration_steps=0, token_mask_fn=mask_fn)
    dense, _ = _fit(family, None)
    keep_all, _ = _fit(family, ContextualSparsity("none", 0.5, **options))
    sparse, recorder = _fit(family, ContextualSparsity("oracle", 0.5, **options))
    names = [f"net.{b.name}" for b in describe(build(family)).mlps]
    assert recorder.seen == [{name: 0.5 for name in names}] * 3
    for name in dense:
        # Adam turns ~1e-7 gradient rounding on near-zero entries into ~1e-5 steps; real errors are far larger.
        torch.testing.assert_close(keep_all[name], dense[name], rtol=1e-5, atol=1e-4)
    assert all(torch.isfinite(p).all() for p in sparse.values())
    assert any(not torch.allclose(sparse[name], dense[name], atol=1e-3) for name in dense)


@pytest.mark.parametrize("family", ["Qwen2", "GPT-NeoX (fused QKV)"])
def test_input_gradient_savings_are_counted_only_where_the_dense_model_computes_them(family: str) -> None:
    """The first attention's q/k/v outputs need a gradient (trainable biases) but their input does not
    (frozen embeddings), so the dense model computes no input gradient there: only their forward savings
    count, and the measured FLOPs fall by exactly what is reported."""
    model = _model(family, lora=False)
    anatomy = describe(model)
    for part in anatomy.attentions[0].groups[0].producers + anatomy.attentions[0].groups[1].producers:
        model.get_submodule(part.path).bias.requires_grad_(True)
    embeds = torch.randn(2, 6, HIDDEN)  # no grad

    def measured() -> int:
        with FlopCounterMode(display=False) as counter:
            _output(model, embeds).sum().backward()
        return counter.get_total_flops()

    dense = measured()
    state = SparsityState(active=True, context_mask=_mask())
    sparsify(model, anatomy.mlps + anatomy.attentions, [0.5] * 4, state, "norm")
    sparse = measured()
    assert state.skipped_flops > 0 and dense - sparse == state.skipped_flops
