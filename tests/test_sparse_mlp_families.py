"""Contextual-sparse MLPs beyond LLaMA: the plain layouts (GPT-NeoX, GPT-J, Phi, StarCoder2, GPT-2)
and BERT-style encoders, found by structure, exact against the dense model with the dropped
channels zeroed for the context tokens, cleanly unwrapped, and trained through the callback."""

from __future__ import annotations

from collections.abc import Callable

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    BertConfig,
    BertModel,
    FalconConfig,
    FalconForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GPTJConfig,
    GPTJForCausalLM,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    PhiConfig,
    PhiForCausalLM,
    Starcoder2Config,
    Starcoder2ForCausalLM,
)

from lightning_sft import ContextualSparsity, LoRA, LoRAConfig, inject_lora, lora_layers
from lightning_sft.sparsity import (
    SparseBertMLP,
    SparsePlainMLP,
    SparsityState,
    mlp_flops,
    unwrap_all,
    wrap_bert_mlps,
    wrap_plain_mlps,
)
from lightning_sft.sparsity.discovery import find_targets

HIDDEN, INTERMEDIATE, VOCAB = 32, 128, 128
_SIZES = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=64)


def _gpt_neox() -> nn.Module:
    return GPTNeoXForCausalLM(GPTNeoXConfig(**_SIZES))


def _gptj() -> nn.Module:
    return GPTJForCausalLM(GPTJConfig(vocab_size=VOCAB, n_embd=HIDDEN, n_inner=INTERMEDIATE, n_layer=2, n_head=4,
                                      n_positions=64, rotary_dim=4))


def _phi() -> nn.Module:
    return PhiForCausalLM(PhiConfig(**_SIZES))


def _starcoder2(residual_dropout: float = 0.0) -> nn.Module:
    return Starcoder2ForCausalLM(Starcoder2Config(**_SIZES, num_key_value_heads=2, residual_dropout=residual_dropout))


def _gpt2() -> nn.Module:
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_inner=INTERMEDIATE, n_layer=2, n_head=4,
                                      n_positions=64))


def _bert(**config: object) -> nn.Module:
    return BertModel(BertConfig(**_SIZES, **config), add_pooling_layer=False)


# family -> (builder, kind, target names, the MLP projections LoRA adapts, what the reference masks)
FAMILIES: dict[str, tuple[Callable[[], nn.Module], str, list[str], list[str] | str, str]] = {
    "gpt_neox": (_gpt_neox, "plain", [f"gpt_neox.layers.{i}.mlp" for i in range(2)],
                 ["dense_h_to_4h", "dense_4h_to_h"], "act"),
    "gptj": (_gptj, "plain", [f"transformer.h.{i}.mlp" for i in range(2)], ["fc_in", "fc_out"], "act"),
    "phi": (_phi, "plain", [f"model.layers.{i}.mlp" for i in range(2)], ["fc1", "fc2"], "activation_fn"),
    "starcoder2": (_starcoder2, "plain", [f"model.layers.{i}.mlp" for i in range(2)], ["c_fc", "c_proj"], "act"),
    "gpt2": (_gpt2, "plain", [f"transformer.h.{i}.mlp" for i in range(2)], ["mlp.c_fc", "mlp.c_proj"], "act"),
    "bert": (_bert, "bert", [f"encoder.layer.{i}" for i in range(2)], r".*\.(intermediate|\d+\.output)\.dense",
             "intermediate"),
}


def _model(family: str, lora: bool = True, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    build, _, _, projections, _ = FAMILIES[family]
    model = build().eval()
    if lora:
        inject_lora(model, LoRAConfig(r=4, target_modules=projections))
        with torch.no_grad():
            for layer in lora_layers(model).values():
                layer.lora_B.normal_(0, 0.1)
    else:
        model.requires_grad_(False)
    return model


def _mask(seed: int = 1, shape: tuple[int, int] = (2, 6)) -> torch.Tensor:
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < 0.6
    mask[:, 0], mask[:, -1] = True, False  # both kinds of token in every sample
    return mask


def _wrap(model: nn.Module, state: SparsityState, strategy: str, sparsity: float = 0.5, **options: object) -> list[str]:
    targets = find_targets(model)
    return targets.wrap_mlps(model, state, strategy, [sparsity] * len(targets.mlps), **options)


Run = tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]


def _run(model: nn.Module, embeds: torch.Tensor) -> Run:
    """Output, input gradient and LoRA gradients of one forward/backward."""
    model.zero_grad(set_to_none=True)
    x = embeds.clone().requires_grad_(True)
    out = model(inputs_embeds=x)
    out = out.logits if hasattr(out, "logits") else out.last_hidden_state
    out.square().mean().backward()
    lora = {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n and p.grad is not None}
    return out.detach(), x.grad, lora


def _assert_runs_close(a: Run, b: Run, atol: float = 1e-6) -> None:
    torch.testing.assert_close(a[0], b[0], atol=atol, rtol=1e-5)
    torch.testing.assert_close(a[1], b[1], atol=atol, rtol=1e-5)
    assert a[2].keys() == b[2].keys() and a[2]
    for name in a[2]:
        torch.testing.assert_close(a[2][name], b[2][name], atol=atol, rtol=1e-5, msg=name)


def _structure(model: nn.Module) -> list[tuple[str, type]]:
    return [(name, type(module)) for name, module in model.named_modules()]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_found_by_structure_in_depth_order(family: str) -> None:
    model = _model(family, lora=False)
    _, kind, names, _, _ = FAMILIES[family]
    targets = find_targets(model)
    assert targets.mlp_kind == kind
    assert [name for name, _ in targets.mlps] == names
    assert all(model.get_submodule(name) is module for name, module in targets.mlps)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_keep_all_equals_dense(family: str) -> None:
    model = _model(family)
    embeds = torch.randn(2, 6, HIDDEN)
    dense = _run(model, embeds)
    state = SparsityState()
    names = _wrap(model, state, "none")
    assert len(names) == 2
    state.active, state.context_mask = True, _mask()
    _assert_runs_close(_run(model, embeds), dense)
    assert state.layer_sparsity == {name: 0.0 for name in names} and state.skipped_flops == 0


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("sparse_output_tokens", [False, True])
def test_oracle_half_matches_masked_dense(family: str, sparse_output_tokens: bool) -> None:
    """Outputs, input and LoRA gradients equal the dense model whose dropped intermediate channels
    are zeroed (after the activation) for the sparse tokens; both products of every MLP skip them."""
    model = _model(family)
    _, kind, _, _, activation = FAMILIES[family]
    embeds = torch.randn(2, 6, HIDDEN)
    mask = _mask()
    state = SparsityState(active=True, context_mask=mask, sparse_output_tokens=sparse_output_tokens)
    keys = list(model.state_dict())
    names = _wrap(model, state, "oracle")
    assert list(model.state_dict()) == keys  # wrapping keeps every parameter name
    wrappers = [model.get_submodule(name) for name in names]
    assert all(isinstance(w, SparseBertMLP if kind == "bert" else SparsePlainMLP) for w in wrappers)
    chosen: dict[str, torch.Tensor] = {}

    def record(wrapper: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        chosen[wrapper.name] = wrapper.estimator.select(args[0], wrapper.keep, context_mask=mask)

    handles = [w.register_forward_pre_hook(record) for w in wrappers]
    sparse = _run(model, embeds)
    for handle in handles:
        handle.remove()
    assert all(idx.numel() == INTERMEDIATE // 2 for idx in chosen.values())
    tokens = mask.sum().item() if not sparse_output_tokens else mask.numel()
    predicted = mlp_flops(HIDDEN, INTERMEDIATE, context_tokens=tokens, output_tokens=mask.numel() - tokens,
                          kept=INTERMEDIATE // 2, gated=False).skipped
    assert state.skipped_flops == 2 * predicted
    assert state.layer_sparsity == {name: 0.5 for name in names}

    assert unwrap_all(model) == names
    rows = torch.ones_like(mask) if sparse_output_tokens else mask

    def zero_dropped(name: str) -> Callable[..., torch.Tensor]:
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
            keep = torch.zeros(INTERMEDIATE)
            keep[chosen[name]] = 1.0
            return torch.where(rows[..., None], out * keep, out)
        return hook

    for name in names:
        # plain: the activation's output; BERT: the intermediate's (dense + activation)
        module = model.get_submodule(name if kind == "bert" else f"{name}.{activation}")
        module.register_forward_hook(zero_dropped(name))
    reference = _run(model, embeds)
    _assert_runs_close(sparse, reference)
    assert len(sparse[2]) == 2 * 2 * 2  # lora_A and lora_B of both projections of both layers
    dense = _run(_model(family), embeds)
    assert not torch.allclose(sparse[0], dense[0], atol=1e-4)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_unwrap_restores_module_tree_and_keys(family: str) -> None:
    model = _model(family)
    embeds = torch.randn(2, 6, HIDDEN)
    structure, keys, adapted = _structure(model), list(model.state_dict()), set(lora_layers(model))
    originals = {name: module for name, module in model.named_modules()}
    before = _run(model, embeds)[0]
    state = SparsityState(active=True, context_mask=_mask())
    names = _wrap(model, state, "svd", rank=4)
    assert list(model.state_dict()) == keys and set(lora_layers(model)) == adapted
    assert not torch.allclose(_run(model, embeds)[0], before, atol=1e-4)
    assert unwrap_all(model) == names
    assert _structure(model) == structure and list(model.state_dict()) == keys
    assert all(module is originals[name] for name, module in model.named_modules())
    assert not any(module._forward_hooks or module._forward_pre_hooks for module in model.modules())
    torch.testing.assert_close(_run(model, embeds)[0], before, atol=0, rtol=0)


def test_bert_output_projection_computes_only_kept_columns() -> None:
    """Measured FLOPs (forward and input-gradient backward) fall by exactly what is reported:
    both intermediate.dense rows and output.dense columns are sliced for the context tokens."""
    model = _model("bert", lora=False)
    embeds = torch.randn(2, 6, HIDDEN)
    mask = _mask()

    def measured() -> int:
        with FlopCounterMode(display=False) as counter:
            model(inputs_embeds=embeds.clone().requires_grad_(True)).last_hidden_state.sum().backward()
        return counter.get_total_flops()

    dense = measured()
    state = SparsityState(active=True, context_mask=mask)
    _wrap(model, state, "norm", sparsity=0.75)  # static scores: the estimator adds no matmul
    sparse = measured()
    context = int(mask.sum())
    one_layer = mlp_flops(HIDDEN, INTERMEDIATE, context_tokens=context, output_tokens=mask.numel() - context,
                          kept=INTERMEDIATE // 4, gated=False).skipped
    assert state.skipped_flops == 2 * one_layer
    assert dense - sparse == 2 * one_layer


def test_bert_dropped_output_is_what_the_output_projection_loses() -> None:
    """Calibration's error measure: output.dense's product with the dropped channels (no bias)."""
    model = _model("bert")
    _wrap(model, SparsityState(), "norm")
    layer = model.encoder.layer[1]
    rows, idx = torch.randn(5, HIDDEN), torch.arange(0, INTERMEDIATE, 3)
    keep = torch.zeros(INTERMEDIATE)
    keep[idx] = 1.0
    with torch.no_grad():
        h = layer.intermediate.original(rows)
        expected = layer.output.dense(h) - layer.output.dense(h * keep)
    torch.testing.assert_close(layer.intermediate.dropped_output(rows, idx), expected, atol=1e-6, rtol=1e-5)


def test_bert_refuses_chunked_feed_forward_and_foreign_calls() -> None:
    model = _model("bert", lora=False)
    model.encoder.layer[1].chunk_size_feed_forward = 2
    structure = _structure(model)
    state = SparsityState(active=True, context_mask=_mask())
    with pytest.raises(ValueError, match="chunk_size_feed_forward"):
        _wrap(model, state, "norm")
    assert _structure(model) == structure  # the first layer, which was fine, is not wrapped either
    model.encoder.layer[1].chunk_size_feed_forward = 0
    _wrap(model, state, "norm")
    layer = model.encoder.layer[0]
    x = torch.randn(2, 6, HIDDEN)
    h = layer.intermediate(x)
    with pytest.raises(RuntimeError, match="output.dense\\(intermediate\\(x\\)\\)"):
        layer.output(h.clone(), x)
    assert not layer.output.dense._forward_pre_hooks  # the refused hand-over is released
    with pytest.raises(TypeError, match="not a BERT-style layer"):
        wrap_bert_mlps(model, state, "norm", [0.5], [("encoder.layer.0.attention", layer.attention)])


def test_starcoder2_functional_dropout_follows_the_model_mode() -> None:
    model = _starcoder2(residual_dropout=0.5)
    model.requires_grad_(False).eval()
    state = SparsityState(active=True, context_mask=torch.ones(2, 6, dtype=torch.bool))
    _wrap(model, state, "norm")
    wrapper = model.model.layers[0].mlp
    assert wrapper.layout.dropout == "residual_dropout" and not wrapper.training
    x = torch.randn(2, 6, HIDDEN)
    assert (wrapper(x) == 0).float().mean() < 0.05
    model.train()
    assert wrapper.training and wrapper.original.training
    assert 0.3 < (wrapper(x) == 0).float().mean() < 0.7
    model.eval()
    assert not wrapper.original.training


def test_layers_that_only_look_like_mlps_are_not_taken_for_them() -> None:
    # OPT's decoder layer holds fc1, fc2 and activation_fn next to its attention: no MLP; its
    # attention uses out_proj, so there is nothing to apply sparsity to.
    opt = OPTForCausalLM(OPTConfig(vocab_size=VOCAB, hidden_size=HIDDEN, ffn_dim=INTERMEDIATE, num_hidden_layers=2,
                                   num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=HIDDEN))
    with pytest.raises(TypeError, match="no recognisable MLP.*fc1, fc2, activation_fn"):
        find_targets(opt)
    mixed = nn.ModuleDict({"decoder": _gpt_neox(), "encoder": _bert()})
    with pytest.raises(TypeError, match="mixes MLP kinds: plain .*bert"):
        find_targets(mixed)


def test_falcon_is_found_but_its_linear_subclass_is_refused_unchanged() -> None:
    model = FalconForCausalLM(FalconConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2,
                                           num_attention_heads=4, ffn_hidden_size=INTERMEDIATE))
    model.requires_grad_(False)
    structure = _structure(model)
    with pytest.raises(TypeError, match="FalconLinear"):
        _wrap(model, SparsityState(), "norm")
    assert _structure(model) == structure


def test_plain_mlp_with_an_extra_child_is_refused() -> None:
    model = _model("gpt_neox", lora=False)
    mlp = model.gpt_neox.layers[0].mlp
    mlp.norm = nn.LayerNorm(INTERMEDIATE)  # something the sparse path would silently skip
    with pytest.raises(TypeError, match="not a plain MLP: its child modules .*norm.*match none"):
        wrap_plain_mlps(model, SparsityState(), "norm", [0.5], [("gpt_neox.layers.0.mlp", mlp)])


# -- through the Trainer -------------------------------------------------------------------------------


class _Module(pl.LightningModule):
    """A causal LM (GPT-NeoX) or an encoder (BERT, a toy regression loss) trained with LoRA."""

    def __init__(self, family: str) -> None:
        super().__init__()
        self.family = family
        torch.manual_seed(0)
        self.net = FAMILIES[family][0]()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.family == "bert":
            return self.net(input_ids=batch["input_ids"]).last_hidden_state.square().mean()
        return self.net(input_ids=batch["input_ids"], labels=batch["labels"]).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def _batches(n: int = 16, length: int = 12) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (n, length), generator=g)
    labels = ids.clone()
    labels[:, : length // 2] = -100  # a prompt half (context, sparse) and an answer half (dense)
    return [{"input_ids": ids[i], "labels": labels[i]} for i in range(n)]


class _Recorder(pl.Callback):
    def __init__(self, sparsity: ContextualSparsity) -> None:
        self.sparsity, self.layer_sparsity = sparsity, []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        self.layer_sparsity.append(dict(self.sparsity.state.layer_sparsity))


def _fit(family: str, sparsity: ContextualSparsity | None) -> tuple[dict[str, torch.Tensor], _Recorder | None]:
    pl.seed_everything(0)
    module = _Module(family)
    recorder = _Recorder(sparsity) if sparsity else None
    callbacks = [LoRA(r=4), *([sparsity, recorder] if sparsity else [])]
    trainer = pl.Trainer(max_steps=3, accelerator="cpu", callbacks=callbacks, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, torch.utils.data.DataLoader(_batches(), batch_size=4))
    assert not any(isinstance(m, (SparsePlainMLP, SparseBertMLP)) for m in module.modules())  # unwrapped after fit
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}, recorder


def _all_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.ones_like(batch["input_ids"], dtype=torch.bool)


@pytest.mark.parametrize("family", ["gpt_neox", "bert"])
def test_fit_with_contextual_sparsity(family: str) -> None:
    mask_fn = _all_tokens if family == "bert" else None  # an encoder: the mask says which tokens are context
    options = dict(dense_layers=(), dense_warmup=0, calibration_steps=0, token_mask_fn=mask_fn)
    dense, _ = _fit(family, None)
    keep_all, _ = _fit(family, ContextualSparsity("none", 0.5, **options))
    sparse, recorder = _fit(family, ContextualSparsity("oracle", 0.5, **options))
    names = [f"net.{name}.intermediate" if family == "bert" else f"net.{name}" for name in FAMILIES[family][2]]
    assert recorder.layer_sparsity == [{name: 0.5 for name in names}] * 3
    for name in dense:
        # Adam turns ~1e-7 gradient rounding on near-zero entries into ~1e-5 steps; real errors are far larger.
        torch.testing.assert_close(keep_all[name], dense[name], rtol=1e-5, atol=1e-4)
    assert all(torch.isfinite(p).all() for p in sparse.values())
    assert any(not torch.allclose(sparse[name], dense[name], atol=1e-6) for name in dense)
