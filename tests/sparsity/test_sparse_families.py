"""Contextual sparsity on every family, by one structural description: the oracle at 50% equals the
dense model whose dropped channels are zeroed for the sparse tokens (outputs, input and LoRA
gradients), keep-all equals dense, nothing is left behind, and the SVD estimator trains through
the callback. The families table of docs/contextual_sparsity.md is generated from these results
(``LSFT_WRITE_DOCS=1 python3 -m pytest tests/sparsity/test_sparse_families.py`` rewrites it)."""

from __future__ import annotations


import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from generated_docs import check_generated
from family_models import FAMILIES, HIDDEN, MOE, FamilyModule, SparsityRecorder, build, token_batches
from lightning_sft import ContextualSparsity, LoRA, LoRAConfig, inject_lora, lora_layers
from lightning_sft.anatomy import BlockAnatomy, describe
from lightning_sft.sparsity import SparseBlock, SparsityState, desparsify, sparse_blocks, sparsify

RESULTS: dict[str, dict[str, str]] = {}


def _model(family: str) -> nn.Module:
    model = build(family)
    inject_lora(model, LoRAConfig(r=4, target_modules="all-linear"))
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(0, 0.1)
    return model


def _mask() -> torch.Tensor:
    mask = torch.rand(2, 6, generator=torch.Generator().manual_seed(1)) < 0.6
    mask[:, 0], mask[:, -1] = True, False  # both kinds of token in every sample
    return mask


Run = tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]


def _run(model: nn.Module, embeds: torch.Tensor) -> Run:
    model.zero_grad(set_to_none=True)
    x = embeds.clone().requires_grad_(True)
    out = model(inputs_embeds=x)
    out = out.logits if hasattr(out, "logits") else out.last_hidden_state
    out.square().mean().backward()
    lora = {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n and p.grad is not None}
    return out.detach(), x.grad, lora


def _assert_close(a: Run, b: Run) -> None:
    torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(a[1], b[1], atol=1e-5, rtol=1e-4)
    assert a[2].keys() == b[2].keys() and a[2]
    for name in a[2]:
        torch.testing.assert_close(a[2][name], b[2][name], atol=1e-5, rtol=1e-4, msg=name)


def _blocks(family: str, model: nn.Module) -> list[BlockAnatomy]:
    anatomy = describe(model)
    assert len(anatomy.attentions) == 2
    assert len(anatomy.mlps) == (0 if family in MOE else 2)
    assert len(anatomy.moe) == (2 if family in MOE else 0)
    return anatomy.mlps + anatomy.attentions


def _zero_dropped(model: nn.Module, blocks: list[BlockAnatomy], chosen: dict[str, dict[str, torch.Tensor]],
                  mask: torch.Tensor) -> list:
    """The reference: dense modules whose producers' dropped output rows and consumers' dropped input
    columns are zeroed on the sparse tokens."""
    handles = []
    flat = mask.reshape(-1)

    def keep_only(width: int, kept: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        keep = torch.zeros(width, dtype=value.dtype)
        keep[kept] = 1
        rows = value.reshape(-1, width)
        return torch.where(flat[:, None], rows * keep, rows).view(value.shape)

    produced: dict[str, list[torch.Tensor]] = {}
    consumed: dict[str, list[torch.Tensor]] = {}
    for block in blocks:
        for group in block.groups:
            idx = chosen[block.name][group.name]
            for part in group.producers:  # a fused projection: the kept rows of all its slices
                produced.setdefault(part.path, []).append(part.physical(idx))
            for part in group.consumers:
                consumed.setdefault(part.path, []).append(part.physical(idx))
    for path, kept in produced.items():
        handles.append(model.get_submodule(path).register_forward_hook(
            lambda m, a, out, kept=torch.cat(kept): keep_only(out.shape[-1], kept, out)))
    for path, kept in consumed.items():
        handles.append(model.get_submodule(path).register_forward_pre_hook(
            lambda m, a, kept=torch.cat(kept): (keep_only(a[0].shape[-1], kept, a[0]), *a[1:])))
    return handles


@pytest.mark.parametrize("family", list(FAMILIES))
def test_keep_all_equals_dense_and_unwrap_restores(family: str) -> None:
    model = _model(family)
    embeds = torch.randn(2, 6, HIDDEN)
    dense = _run(model, embeds)
    keys = list(model.state_dict())
    state = SparsityState(active=True, context_mask=_mask())
    blocks = _blocks(family, model)
    installed = sparsify(model, blocks, [0.5] * len(blocks), state, "none")
    assert len(installed) == len(blocks) and list(model.state_dict()) == keys
    _assert_close(_run(model, embeds), dense)
    assert state.layer_sparsity and all(value == 0.0 for value in state.layer_sparsity.values())
    assert state.skipped_flops == 0
    assert sorted(desparsify(model)) == sorted(b.name for b in blocks)
    assert not sparse_blocks(model) and not any("forward" in m.__dict__ for m in model.modules())
    torch.testing.assert_close(_run(model, embeds)[0], dense[0], atol=0, rtol=0)


def record_choices(installed: list[SparseBlock]) -> dict[str, dict[str, torch.Tensor]]:
    """The channels every estimator of ``installed`` picks, per block and group, as they are picked."""
    chosen: dict[str, dict[str, torch.Tensor]] = {}
    for block in installed:
        for name, estimator in block.estimators.items():
            def record(*args, _select=estimator.select, _block=block.name, _name=name, **kwargs):
                idx = _select(*args, **kwargs)
                chosen.setdefault(_block, {})[_name] = idx
                return idx
            estimator.select = record
    return chosen


@pytest.mark.parametrize("family", list(FAMILIES))
def test_oracle_half_matches_dense_with_dropped_channels_zeroed(family: str) -> None:
    model = _model(family)
    embeds = torch.randn(2, 6, HIDDEN)
    mask = _mask()
    state = SparsityState(active=True, context_mask=mask)
    blocks = _blocks(family, model)
    installed = sparsify(model, blocks, [0.5] * len(blocks), state, "oracle")
    chosen = record_choices(installed)
    sparse = _run(model, embeds)
    assert set(chosen) == {b.name for b in blocks}
    for block in installed:
        for group in block.anatomy.groups:
            assert chosen[block.name][group.name].numel() == block.keep[group.name] < group.channels
    assert state.skipped_flops > 0
    desparsify(model)
    dense = _run(model, embeds)
    handles = _zero_dropped(model, blocks, chosen, mask)
    reference = _run(model, embeds)
    for handle in handles:
        handle.remove()
    _assert_close(sparse, reference)
    assert not torch.allclose(sparse[0], dense[0], atol=1e-4)  # the sparsity did change something
    RESULTS.setdefault(family, {})["exact"] = "yes"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_svd_trains_through_the_callback(family: str) -> None:
    mlp = 0.0 if family in MOE else 0.5
    sparsity = ContextualSparsity("svd", mlp_sparsity=mlp, attn_sparsity=0.5, dense_layers=(), dense_warmup=1,
                                  calibration_steps=1, estimator_rank=2)
    record = SparsityRecorder(sparsity)
    module = FamilyModule(family)
    trainer = pl.Trainer(max_steps=3, accelerator="cpu", callbacks=[LoRA(r=4), sparsity, record], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, torch.utils.data.DataLoader(token_batches(), batch_size=4))
    sparse_steps = record.seen[1:]
    assert sparse_steps and all(steps for steps in sparse_steps)
    mlps = [name for name in sparse_steps[0] if not name.endswith((".qk", ".v"))]
    assert len(mlps) == (0 if family in MOE else 2)
    assert all(0.4 <= value <= 0.6 for step in sparse_steps for value in step.values())
    assert not sparse_blocks(module) and not any("forward" in m.__dict__ for m in module.modules())
    row = RESULTS.setdefault(family, {})
    row["mlp"] = "refused: MoE experts" if family in MOE else "yes"
    row["attention"] = "yes"
    row["svd"] = "yes"


def _table() -> str:
    lines = ["| family | MLP sparse | attention sparse | oracle exact | svd trains |", "|---|---|---|---|---|"]
    for family in FAMILIES:
        row = RESULTS.get(family, {})
        cells = [row.get(key, "no") for key in ("mlp", "attention", "exact", "svd")]
        lines.append(f"| {family} | {' | '.join(cells)} |")
    return "\n".join(lines)


def test_docs_families_table_is_generated_from_these_results() -> None:
    if len(RESULTS) != len(FAMILIES) or any(len(row) != 4 for row in RESULTS.values()):
        pytest.skip("needs the whole module's results (run the file, not one test)")
    check_generated("contextual_sparsity.md", "families table", _table(), "tests/sparsity/test_sparse_families.py")


# -- bad input: a clear error, the model unchanged -------------------------------------------------------


def _snapshot(module: nn.Module) -> tuple:
    return (
        [(name, type(m)) for name, m in module.named_modules()],
        {k: v.clone() for k, v in module.state_dict().items()},
        [p.requires_grad for p in module.parameters()],
    )


def _assert_unchanged(module: nn.Module, before: tuple) -> None:
    after = _snapshot(module)
    assert after[0] == before[0] and after[2] == before[2]
    assert after[1].keys() == before[1].keys()
    assert all(torch.equal(after[1][k], before[1][k]) for k in before[1])
    assert not sparse_blocks(module) and not any("forward" in m.__dict__ for m in module.modules())


def _fit_refused(module: pl.LightningModule, sparsity: ContextualSparsity, error: type, match: str) -> None:
    before = _snapshot(module)
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", callbacks=[sparsity, LoRA(r=4)], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(error, match=match):
        trainer.fit(module, torch.utils.data.DataLoader(token_batches(), batch_size=4))
    _assert_unchanged(module, before)


def test_fused_projection_that_does_not_split_as_the_config_says_is_refused() -> None:
    module = FamilyModule("Phi-3 (fused)")
    module.net.config.num_key_value_heads = 1  # the weights hold 2 kv heads' rows
    _fit_refused(module, ContextualSparsity("svd", attn_sparsity=0.5), ValueError,
                 r"qkv_proj.*do not split as the config says .*4 heads, 1 kv heads")


def test_heads_that_cannot_be_paired_under_gqa_are_refused() -> None:
    module = FamilyModule("LLaMA")
    module.net.config.num_key_value_heads = 3
    _fit_refused(module, ContextualSparsity("svd", attn_sparsity=0.5), ValueError,
                 "4 query heads cannot be paired with 3 kv heads")


def test_a_layer_mapping_naming_a_missing_layer_is_refused() -> None:
    _fit_refused(FamilyModule("GPT-NeoX (fused QKV)"), ContextualSparsity("svd", mlp_sparsity={5: 0.5}), ValueError,
                 "Layer key 5 is outside layers 0-1")


def test_mixture_of_experts_mlps_are_refused_with_the_way_out() -> None:
    _fit_refused(FamilyModule("Mixtral (MoE)"), ContextualSparsity("svd", mlp_sparsity=0.5), ValueError,
                 r"model.layers.0.mlp is a mixture-of-experts block.*mlp_sparsity=0")


def test_a_model_without_described_blocks_names_what_was_looked_for() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(TypeError, match=r"no recognisable MLP or attention.*gate_proj, up_proj, down_proj.*qkv_proj"):
        describe(model)


def test_a_config_whose_forward_bypasses_the_projections_is_refused() -> None:
    model = build("BLOOM").requires_grad_(False)
    model.config.pretraining_tp = 2  # BloomMLP then slices dense_4h_to_h's weight by hand
    with pytest.raises(ValueError, match=r"transformer.h.0.mlp \(BLOOM\) has config.pretraining_tp = 2"):
        describe(model)


class _ShortcutMLP(nn.Module):
    """Looks like a plain MLP, but its forward reads fc2's weight instead of calling fc2."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.activation_fn = nn.Linear(HIDDEN, 64), nn.Linear(64, HIDDEN), nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation_fn(self.fc1(x)) @ self.fc2.weight.T


def test_a_forward_that_skips_a_projection_is_refused_at_its_first_sparse_step() -> None:
    model = nn.ModuleDict({"mlp": _ShortcutMLP()}).requires_grad_(False)
    state = SparsityState(active=True, context_mask=_mask())
    sparsify(model, describe(model).mlps, [0.5], state, "norm")
    with pytest.raises(RuntimeError, match=r"mlp failed on its sparse .* after \['mlp.fc1'\].*each of mlp.fc1, mlp.fc2 once"):
        model["mlp"](torch.randn(2, 6, HIDDEN))
