"""Memory recipes: per-block activation checkpointing, the attention kernel, 8-bit optimizer states;
their callbacks, their composition with LoRA / LayerDropout / ContextualSparsity / SparseFineTuning,
and their CLI flags."""

from __future__ import annotations

import importlib.util
import sys
import types
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from lightning_sft import (
    AttentionImplementation,
    ContextualSparsity,
    EightBitOptimizer,
    GradientCheckpointing,
    LayerDropout,
    LoRA,
    SparseFineTuning,
    disable_gradient_checkpointing,
    eight_bit_optimizer,
    enable_gradient_checkpointing,
    set_attention_implementation,
)
from lightning_sft.cli import SFTCLI
from lightning_sft.anatomy.stacks import find_stacks
from lightning_sft.modules import CausalLM
from lightning_sft.modules.causal_lm import lr_factor
from lightning_sft.recipes import checkpointing, rebind_scheduler
from tiny_fits import tiny_data, tiny_fit, tiny_trainer
from tiny_models import VOCAB

pytestmark = pytest.mark.usefixtures("one_thread")
needs_bitsandbytes = pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None, reason="8-bit optimizers need bitsandbytes"
)


# -- helpers ---------------------------------------------------------------------------------------


def _model(family: str, layers: int = 4, dropout: float = 0.0, attention: str = "sdpa") -> nn.Module:
    torch.manual_seed(0)
    if family == "llama":
        config = LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, attention_dropout=dropout,
        )
        model = LlamaForCausalLM(config)
    else:
        config = GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=layers, n_head=4, n_positions=128, bos_token_id=0, eos_token_id=0,
            resid_pdrop=dropout, attn_pdrop=dropout, embd_pdrop=dropout,
        )
        model = GPT2LMHeadModel(config)
    model.set_attn_implementation(attention)
    return model.train()


def _batch(size: int = 2, length: int = 32) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (size, length), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _step(
    model: nn.Module, batch: dict[str, torch.Tensor], count_block_inputs: bool = False
) -> tuple[float, dict[str, torch.Tensor], int]:
    """Loss, gradients and the bytes kept for backward of one forward/backward (seed 1 for dropout).

    Bytes: distinct storages autograd saves (parameters excluded). A checkpointed block saves nothing
    visible to these hooks but keeps its inputs alive for the recompute, so with ``count_block_inputs``
    every block's tensor inputs count too (the same storages are saved without checkpointing).
    """
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    def inputs(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        for value in (*args, *kwargs.values()):
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                pack(value)

    handles = []
    if count_block_inputs:
        handles = [b.register_forward_pre_hook(inputs, with_kwargs=True) for _, s in find_stacks(model) for b in s]
    torch.manual_seed(1)
    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(**batch, labels=batch["input_ids"]).loss
    for handle in handles:
        handle.remove()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads, sum(kept.values())


def _assert_same(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0 if atol == 0 else 1e-5, atol=atol, msg=name)


def _trained(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters() if p.requires_grad}


class _Blocks(nn.Module):
    """Not a transformers model: a plain stack of residual MLP blocks with dropout."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Dropout(0.2), nn.Linear(64, 16)) for _ in range(4)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x)
        return x


# -- gradient checkpointing ------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_checkpointing_keeps_loss_and_gradients_and_cuts_saved_activations(family: str, dropout: float) -> None:
    batch = _batch()
    plain_loss, plain_grads, plain_bytes = _step(_model(family, dropout=dropout), batch, count_block_inputs=True)
    model = _model(family, dropout=dropout)
    names = enable_gradient_checkpointing(model)
    assert len(names) == 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the empty KV cache HF passes in training is dropped silently
        loss, grads, kept = _step(model, batch, count_block_inputs=True)
    assert loss == plain_loss  # the recompute replays the dropout masks (RNG preserved)
    _assert_same(plain_grads, grads, atol=1e-6)  # summation order may differ in the last bits
    # Without: every block's internals; with: one input per block (and what lies outside the blocks).
    assert kept < 0.4 * plain_bytes


def test_checkpointing_any_model_and_exact_restore(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _Blocks().train()
    x = torch.randn(8, 16, requires_grad=True)

    def grads() -> tuple[torch.Tensor, ...]:
        torch.manual_seed(3)
        model.zero_grad(set_to_none=True)
        model(x).square().sum().backward()
        return tuple(p.grad.clone() for p in model.parameters())

    plain = grads()

    def wrapper(*args: torch.Tensor) -> torch.Tensor:  # a forward already set on the instance
        return type(model.layers[1]).forward(model.layers[1], *args)

    model.layers[1].forward = wrapper
    assert enable_gradient_checkpointing(model, blocks=["layers"]) == [f"layers.{i}" for i in range(4)]
    calls = []

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return torch.utils.checkpoint.checkpoint(*args, **kwargs)

    monkeypatch.setattr(checkpointing, "checkpoint", counted)
    for got, expected in zip(grads(), plain):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert len(calls) == 4
    with torch.no_grad():  # no-grad and eval: plain forwards
        model(x)
    model.eval()
    model(x).sum().backward()
    assert len(calls) == 4
    model.train()

    with pytest.raises(ValueError, match="already enabled on 'layers.0'.*disable_gradient_checkpointing"):
        enable_gradient_checkpointing(model)
    assert disable_gradient_checkpointing(model) == [f"layers.{i}" for i in range(4)]
    assert model.layers[1].__dict__["forward"] is wrapper
    assert all("forward" not in vars(model.layers[i]) for i in (0, 2, 3))
    assert disable_gradient_checkpointing(model) == []


def test_checkpointing_refuses_bad_blocks_and_leaves_the_model_unchanged() -> None:
    model = _Blocks()
    with pytest.raises(ValueError, match="'layer'.*not an nn.ModuleList.*found stacks: layers"):
        enable_gradient_checkpointing(model, blocks=["layers", "layer"])
    with pytest.raises(ValueError, match="list of dotted module paths"):
        enable_gradient_checkpointing(model, blocks="layers")
    with pytest.raises(ValueError, match="same block"):
        enable_gradient_checkpointing(model, blocks=["layers", "layers"])
    with pytest.raises(TypeError, match="no stack of blocks"):
        enable_gradient_checkpointing(nn.Linear(2, 2))
    hf = _model("llama", layers=2)
    hf.activation_checkpointing_enable()
    with pytest.raises(ValueError, match="Hugging Face's activation checkpointing"):
        enable_gradient_checkpointing(hf)
    assert all("forward" not in vars(block) for block in [*model.layers, *hf.model.layers])


def test_checkpointing_keeps_the_kv_cache_in_eval_and_refuses_a_filled_one_in_training() -> None:
    model = _model("llama", layers=2)
    enable_gradient_checkpointing(model)
    model.eval()
    cache = model(**_batch(), use_cache=True).past_key_values
    assert cache.get_seq_length() == 32
    model.train()
    with pytest.raises(RuntimeError, match="filled KV cache.*past_key_values=None"):
        model(input_ids=_batch(length=4)["input_ids"], past_key_values=cache)


def _sparsity_fit(root: Path, callbacks: list[pl.Callback], sparsity: ContextualSparsity) -> tuple[dict, list, list]:
    """Adapters after a fit, the per-step skipped FLOPs after backward, and calibration token counts."""
    seen: list[float] = []
    tokens: list[dict[str, int]] = []

    class Probe(pl.Callback):
        def on_train_batch_end(self, *args: Any) -> None:
            seen.append(sparsity.state.skipped_flops)
            tokens.append({name: stats.tokens for name, stats in sparsity.state.statistics.items()})

    module = tiny_fit(root, 5, [Probe(), *callbacks, sparsity])
    return _trained(module), seen, tokens


def _context(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    mask = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
    mask[:, :10] = True
    return mask


@pytest.mark.parametrize("strategy", ["random", "svd"])
def test_checkpointing_with_contextual_sparsity_replays_masks_and_counts_once(tmp_path: Path, strategy: str) -> None:
    # random: a seeded generator, which would draw other channels in the recompute; svd "auto":
    # calibrates on the dense warm-up steps, whose statistics must see each token once.
    def sparsity() -> ContextualSparsity:
        options = {"mlp_sparsity": "auto"} if strategy == "svd" else {"attn_sparsity": 0.5}
        return ContextualSparsity(strategy, dense_layers=(), dense_warmup=2, calibration_steps=2,
                                  token_mask_fn=_context, **options)

    plain = _sparsity_fit(tmp_path / "a", [LoRA(r=4)], sparsity())
    checkpointed = _sparsity_fit(tmp_path / "b", [LoRA(r=4), GradientCheckpointing()], sparsity())
    _assert_same(plain[0], checkpointed[0])
    assert checkpointed[1] == plain[1] and plain[1][-1] > 0  # skipped FLOPs: counted once per step
    assert checkpointed[2] == plain[2]


@pytest.mark.parametrize("order", [1, -1])
def test_checkpointing_with_layer_dropout_and_lora_in_either_order(tmp_path: Path, order: int) -> None:
    def callbacks() -> list[pl.Callback]:
        return [LoRA(r=4, dropout=0.1), LayerDropout(rate=0.5, protect_first=0, protect_last=0, per_sample=True)]

    plain = _trained(tiny_fit(tmp_path / "a", 4, callbacks()))
    checkpointing_callback = GradientCheckpointing()
    module = tiny_fit(tmp_path / "b", 4, [checkpointing_callback, *callbacks()][::order])
    _assert_same(plain, _trained(module))
    assert all("forward" not in vars(block) for block in module.model.model.layers)  # teardown restored them
    assert checkpointing_callback.checkpointed == []


def test_checkpointing_with_sparse_finetuning(tmp_path: Path) -> None:
    plain = _trained(tiny_fit(tmp_path / "a", 3, [SparseFineTuning(density=0.05)], num_train=32))
    callbacks = [GradientCheckpointing(), SparseFineTuning(density=0.05)]
    checkpointed = _trained(tiny_fit(tmp_path / "b", 3, callbacks, num_train=32))
    _assert_same(plain, checkpointed, atol=1e-6)


def _trainer_with(strategy: object, callback: object) -> types.SimpleNamespace:
    """What the callbacks' set-up reads of a Trainer (a CPU Trainer cannot hold FSDPStrategy)."""
    return types.SimpleNamespace(strategy=strategy, callbacks=[callback])


def test_checkpointing_runs_under_fsdp_and_refuses_bad_arguments() -> None:
    callback, module = GradientCheckpointing(), CausalLM(model="tiny-llama")
    callback.setup(_trainer_with(FSDPStrategy(), callback), module, "fit")  # installed before FSDP wraps the blocks
    assert len(callback.checkpointed) == 2
    with pytest.raises(ValueError, match="dotted module paths"):
        GradientCheckpointing(blocks="model.layers")
    with pytest.raises(ValueError, match="Unknown attention implementation 'flash'.*sdpa"):
        AttentionImplementation("flash")


@needs_bitsandbytes
def test_eight_bit_callback_refusals() -> None:
    optimizer = EightBitOptimizer()
    with pytest.raises(RuntimeError, match=r"does not run under FSDP \(FSDPStrategy\): bitsandbytes' 8-bit optimizers"):
        optimizer.setup(_trainer_with(FSDPStrategy(), optimizer), CausalLM(model="tiny-llama"), "fit")
    eight_bit = EightBitOptimizer()
    regrowing = types.SimpleNamespace(strategy=DDPStrategy(), callbacks=[eight_bit, SparseFineTuning(reselect_every=8)])
    with pytest.raises(ValueError, match="EightBitOptimizer cannot run with SparseFineTuning: .* reselect_every=None"):
        eight_bit.setup(regrowing, CausalLM(model="tiny-llama"), "fit")
    fixed = types.SimpleNamespace(strategy=DDPStrategy(), callbacks=[eight_bit, SparseFineTuning()])
    eight_bit.setup(fixed, CausalLM(model="tiny-llama"), "fit")  # without regrowth they go together
    with pytest.raises(ValueError, match="min_8bit_size"):
        EightBitOptimizer(min_8bit_size=-1)


# -- attention -------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_sdpa_equals_eager_and_keeps_no_attention_matrix(family: str) -> None:
    batch = _batch(length=96)
    model = _model(family, layers=2, attention="eager")
    eager_loss, eager_grads, eager_bytes = _step(model, batch)
    assert set_attention_implementation(model, "sdpa") == "eager"
    sdpa_loss, sdpa_grads, sdpa_bytes = _step(model, batch)
    assert sdpa_loss == pytest.approx(eager_loss, rel=1e-5)
    _assert_same(eager_grads, sdpa_grads, atol=1e-5)
    # eager keeps the b x heads x s x s probabilities of each layer (2 x 4 x 96^2 x 4 bytes = 295 KB); sdpa
    # keeps its output and a log-sum-exp per row instead (b x heads x s x (head_dim + 1) floats: 27 KB).
    probabilities = 2 * 4 * 96 * 96 * 4
    assert eager_bytes - sdpa_bytes > 2 * 0.75 * probabilities


def test_attention_refusals_leave_the_model_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    pair = nn.ModuleDict({"llama": _model("llama", layers=2), "gpt2": _model("gpt2", layers=2)})
    configs = [m.config for m in pair.modules() if hasattr(m, "config")]
    with pytest.raises(ValueError, match="Unknown attention implementation 'fast'"):
        set_attention_implementation(pair, "fast")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="flash_attention_2 needs a CUDA GPU"):
            set_attention_implementation(pair, "flash_attention_2")
        with pytest.raises(ValueError, match="flex_attention trains on GPU only"):
            set_attention_implementation(pair, "flex_attention")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    # LLaMA takes flex_attention, GPT-2 does not: the LLaMA switched first is switched back.
    with pytest.raises(ValueError, match="'flex_attention'.*GPT2LMHeadModel does not support"):
        set_attention_implementation(pair, "flex_attention")
    assert {config._attn_implementation for config in configs} == {"sdpa"}
    with pytest.raises(TypeError, match="no Hugging Face transformers model.*scaled_dot_product_attention"):
        set_attention_implementation(_Blocks(), "sdpa")


# -- 8-bit optimizer -------------------------------------------------------------------------------


def _state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for s in optimizer.state.values() for k, v in s.items()
               if isinstance(v, torch.Tensor) and not k.startswith("qmap"))


def _params(seed: int = 0) -> list[nn.Parameter]:
    torch.manual_seed(seed)
    return [nn.Parameter(torch.randn(256, 64)), nn.Parameter(torch.randn(64, 128)), nn.Parameter(torch.randn(64))]


def _train(optimizer: torch.optim.Optimizer, params: list[nn.Parameter], steps: int = 3) -> None:
    for step in range(steps):
        torch.manual_seed(10 + step)
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer.step()


@needs_bitsandbytes
@pytest.mark.parametrize(
    ("make", "kind"),
    [
        (lambda g: torch.optim.AdamW(g, lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1), "AdamW8bit"),
        (lambda g: torch.optim.Adam(g, lr=1e-2, betas=(0.8, 0.99)), "Adam8bit"),
        (lambda g: torch.optim.SGD(g, lr=1e-2, momentum=0.9, weight_decay=0.01), "SGD8bit"),
    ],
)
def test_eight_bit_optimizer_keeps_groups_and_hyperparameters(make: Any, kind: str) -> None:
    # With fp32 states (min_8bit_size above every tensor) bitsandbytes runs the same update as torch.
    def groups(params: list[nn.Parameter]) -> list[dict[str, Any]]:
        return [{"params": params[:2]}, {"params": params[2:], "lr": 3e-2, "weight_decay": 0.0, "name": "bias"}]

    reference_params, params = _params(), _params()
    reference = make(groups(reference_params))
    converted = eight_bit_optimizer(make(groups(params)), min_8bit_size=10**9)
    assert type(converted).__name__ == kind
    assert converted.param_groups[1]["lr"] == 3e-2 and converted.param_groups[1]["name"] == "bias"
    _train(reference, reference_params)
    _train(converted, params)
    for got, expected in zip(params, reference_params):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@needs_bitsandbytes
def test_eight_bit_states_are_four_times_smaller() -> None:
    fp32_params, params = _params(), _params()
    fp32 = torch.optim.AdamW(fp32_params[:2], lr=1e-3)
    eight = eight_bit_optimizer(torch.optim.AdamW(params[:2], lr=1e-3))
    _train(fp32, fp32_params[:2], steps=1)
    _train(eight, params[:2], steps=1)
    numel = sum(p.numel() for p in params[:2])
    assert _state_bytes(fp32) >= 8 * numel
    # Two uint8 states plus one fp32 absmax per 256 values and state: 2 + 8 / 256 bytes per parameter.
    assert _state_bytes(eight) <= (2 + 8 / 256) * numel + 64
    assert _state_bytes(fp32) / _state_bytes(eight) > 3.8
    # A tensor below min_8bit_size keeps fp32 states.
    small = eight_bit_optimizer(torch.optim.AdamW(params[2:], lr=1e-3))
    _train(small, params[2:], steps=1)
    assert _state_bytes(small) >= 8 * params[2].numel()


@needs_bitsandbytes
@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda p: torch.optim.RMSprop(p), TypeError, "No 8-bit counterpart for RMSprop.*bitsandbytes"),
        (lambda p: torch.optim.AdamW(p, amsgrad=True), ValueError, "amsgrad=True"),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True), ValueError, "nesterov"),
        (lambda p: torch.optim.SGD(p, lr=0.1), ValueError, "no momentum"),
        (lambda p: torch.optim.Adam(p, weight_decay=0.1), ValueError, "L2.*AdamW"),
    ],
)
def test_eight_bit_optimizer_refusals(make: Any, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        eight_bit_optimizer(make(_params()))


@needs_bitsandbytes
def test_rebound_chained_schedulers_drive_the_new_optimizer() -> None:
    def schedule(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.25, total_iters=2)
        decay = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.5)
        return torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, decay], milestones=[2])

    reference_params, params = _params(), _params()
    reference = torch.optim.AdamW(reference_params, lr=1e-2)
    reference_schedule = schedule(reference)
    old = torch.optim.AdamW(params, lr=1e-2)
    scheduler = schedule(old)
    new = eight_bit_optimizer(old)
    rebind_scheduler(scheduler, old, new)
    assert scheduler.optimizer is new and all(s.optimizer is new for s in scheduler._schedulers)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(4):
            _train(new, params, steps=1)
            _train(reference, reference_params, steps=1)
            scheduler.step()
            reference_schedule.step()
            assert new.param_groups[0]["lr"] == pytest.approx(reference.param_groups[0]["lr"])
    assert new.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.25)


@needs_bitsandbytes
def test_eight_bit_optimizer_refuses_a_stepped_optimizer() -> None:
    params = _params()
    optimizer = torch.optim.AdamW(params)
    _train(optimizer, params, steps=1)
    with pytest.raises(ValueError, match="first step"):
        eight_bit_optimizer(optimizer)


class _LossAndLr(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []
        self.lrs: list[float] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, *args: Any) -> None:
        self.losses.append(float(outputs["loss"]))
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


@needs_bitsandbytes
def test_eight_bit_fit_trains_and_follows_the_schedule(tmp_path: Path) -> None:
    record = _LossAndLr()
    pl.seed_everything(0)
    module = CausalLM(model="tiny-llama", lr=1e-2, warmup_steps=4, decay_steps=12)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*lr_scheduler.step.*")
        warnings.filterwarnings("error", message=".*optimizer.step.*")
        tiny_trainer(tmp_path, 12, [EightBitOptimizer(), record]).fit(module, datamodule=tiny_data(num_train=8))
    assert type(module.trainer.optimizers[0]).__name__ == "AdamW8bit"
    assert module.trainer.lr_scheduler_configs[0].scheduler.optimizer is module.trainer.optimizers[0]
    # The lr of step k's update is lr * factor(k); the record reads it after the scheduler stepped.
    assert record.lrs == pytest.approx([1e-2 * lr_factor(k + 1, 4, 12) for k in range(12)])
    # The same 8 sequences every 2 steps: the loss falls.
    assert sum(record.losses[-2:]) < sum(record.losses[:2]) - 0.2


@needs_bitsandbytes
@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
def test_eight_bit_resume_equals_the_uninterrupted_run(tmp_path: Path) -> None:
    def fit(root: Path, steps: int, callbacks: list[pl.Callback], ckpt_path: Path | None = None) -> CausalLM:
        return tiny_fit(root, steps, [EightBitOptimizer(), *callbacks], ckpt_path, num_train=8)

    straight = _trained(fit(tmp_path / "a", 4, []))
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    first = _trained(fit(tmp_path / "b", 2, [ckpt]))  # 2 batches per epoch: step 2 ends an epoch
    (path,) = list((tmp_path / "ckpt").glob("*.ckpt"))
    assert "state1" in str(torch.load(path, weights_only=False)["optimizer_states"][0]["state"][0])
    resumed = _trained(fit(tmp_path / "c", 4, [], ckpt_path=path))
    _assert_same(straight, resumed)
    assert not torch.equal(first["model.lm_head.weight"], resumed["model.lm_head.weight"])


@needs_bitsandbytes
def test_eight_bit_converts_optimizers_rebuilt_after_it(tmp_path: Path) -> None:
    class Rebuild(pl.Callback):  # as AdaptiveRankSearch does after its trials
        def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            trainer.strategy.setup_optimizers(trainer)

    module = tiny_fit(tmp_path, 1, [EightBitOptimizer(), Rebuild()])
    assert type(module.trainer.optimizers[0]).__name__ == "AdamW8bit"


@needs_bitsandbytes
def test_eight_bit_with_manual_optimization(tmp_path: Path) -> None:
    class Manual(CausalLM):
        def __init__(self) -> None:
            super().__init__(model="tiny-llama", lr=1e-2)
            self.automatic_optimization = False

        def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
            optimizer = self.optimizers()
            loss, _, _ = self._forward(batch)
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()
            return loss

    module = Manual()
    tiny_trainer(tmp_path, 2, [EightBitOptimizer()]).fit(module, datamodule=tiny_data(num_train=8))
    assert type(module.optimizers().optimizer).__name__ == "AdamW8bit"
    assert module.optimizers().optimizer.state


# -- CLI -------------------------------------------------------------------------------------------


@needs_bitsandbytes
def test_cli_flags_add_the_recipes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["lightning-sft"])
    common = [
        "--trainer.max_steps", "2", "--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(tmp_path),
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.enable_checkpointing", "false", "--trainer.val_check_interval", "2", "--trainer.logger", "false",
        "--model.model", "tiny-llama", "--data", "lightning_sft.data.RandomTokenData", "--data.seq_len", "16",
        "--data.num_train", "8", "--data.num_val", "4", "--data.batch_size", "4", "--no_lora",
    ]
    recipes = {GradientCheckpointing, AttentionImplementation, EightBitOptimizer}
    flags = ["--gradient-checkpointing", "on", "--attention", "eager", "--optimizer-8bit", "on"]
    cli = SFTCLI(args=["fit", *common, *flags])
    assert recipes <= {type(cb) for cb in cli.trainer.callbacks}
    assert cli.trainer.global_step == 2 and type(cli.trainer.optimizers[0]).__name__ == "AdamW8bit"
    assert cli.model.model.config._attn_implementation == "sdpa"  # put back after the fit

    defaults = SFTCLI(args=common, run=False)
    assert not recipes & {type(cb) for cb in defaults.trainer.callbacks}
    with pytest.raises(SystemExit):
        SFTCLI(args=[*common, "--attention", "flash"], run=False)
