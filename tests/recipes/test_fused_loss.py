"""FusedCrossEntropy / ``recipes.fused_loss``: every causal family's own loss and gradients without its
logits (LoRA on the head, tied embeddings), real logits in evaluation, a fit equal to the unfused one,
and the refusals."""

from __future__ import annotations

from pathlib import Path

import family_models
import lightning.pytorch as pl
import pytest
import torch
from tiny_fits import tiny_fit, tiny_trainer

from lightning_sft import FusedCrossEntropy, LoRA, LoRAConfig, inject_lora
from lightning_sft.modules import CausalLM
from lightning_sft.recipes.fused_loss import FusedLoss, causal_lms, head_term_count, head_terms, refusal

# One thread: the fits compared here sum in another order with more, beyond the tolerance after Adam.
pytestmark = pytest.mark.usefixtures("one_thread")

FP32 = dict(rtol=1e-5, atol=1e-6)  # chunked fp32 sums against HF's one logits matmul: measured <= 2e-7


def _batch(vocab: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :4] = -100  # a prompt the loss ignores
    return {"input_ids": ids, "labels": labels}


def _loss_and_grads(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict, object]:
    out = model(**batch)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    grads = torch.autograd.grad(out.loss, list(params.values()), allow_unused=True)
    return out.loss.detach(), {n: g for n, g in zip(params, grads) if g is not None}, out.logits


def _assert_fused_equals_own(model: torch.nn.Module) -> None:
    (lm,) = causal_lms(model)
    model.train()
    batch = _batch(lm.config.vocab_size)
    torch.manual_seed(0)
    own_loss, own_grads, own_logits = _loss_and_grads(model, batch)
    fused = FusedLoss([lm])
    fused.install()
    torch.manual_seed(0)
    loss, grads, logits = _loss_and_grads(model, batch)
    fused.remove()
    assert own_logits is not None and logits is None  # no (tokens x vocab) logits in training
    torch.testing.assert_close(loss, own_loss, **FP32)
    assert grads and grads.keys() == own_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], own_grads[name], **FP32, msg=name)
    assert "forward" not in vars(lm)


FUSABLE = [f for f in family_models.FAMILIES if f not in ("BERT", "Gemma2")]


@pytest.mark.parametrize("family", FUSABLE)
def test_every_causal_family_gets_its_own_loss_and_gradients(family: str) -> None:
    _assert_fused_equals_own(family_models.build(family))


def test_lora_on_the_head_and_a_tied_head_train_exactly() -> None:
    model = family_models.build("LLaMA")
    inject_lora(model, LoRAConfig(r=4, target_modules=["q_proj", "lm_head"]), torch.Generator().manual_seed(0))
    for layer in (m for n, m in model.named_modules() if n.endswith(("lm_head", "q_proj"))):
        torch.nn.init.normal_(layer.lora_B, std=0.1)  # B = 0 would hide a wrong branch
    _assert_fused_equals_own(model)
    gpt2 = family_models.build("GPT-2 (Conv1D, fused c_attn)")
    assert gpt2.get_output_embeddings().weight is gpt2.get_input_embeddings().weight  # tied
    _assert_fused_equals_own(gpt2)


def test_evaluation_and_calls_without_labels_return_real_logits() -> None:
    model = family_models.build("LLaMA")
    batch = _batch(model.config.vocab_size)
    fused = FusedLoss(causal_lms(model))
    fused.install()
    model.eval()
    with torch.no_grad():
        out = model(**batch)
    model.train()
    unlabelled = model(input_ids=batch["input_ids"])
    fused.remove()
    assert out.logits.shape == (2, 12, model.config.vocab_size) and out.loss is not None
    assert unlabelled.logits is not None


def test_a_fit_with_it_equals_the_fit_without(tmp_path: Path) -> None:
    plain = tiny_fit(tmp_path / "a", 3, [LoRA(r=4)])
    fused_callback = FusedCrossEntropy(chunk_size=5)
    fused = tiny_fit(tmp_path / "b", 3, [LoRA(r=4), fused_callback])
    trained = {n: p for n, p in fused.named_parameters() if p.requires_grad}
    assert trained
    for name, param in plain.named_parameters():
        if param.requires_grad:
            # Adam after three steps amplifies the 1e-7 rounding of near-cancelling gradient entries (lr 1e-2).
            torch.testing.assert_close(trained[name], param, rtol=1e-4, atol=1e-4, msg=name)
    assert "forward" not in vars(fused.model) and fused_callback._fused is None  # removed in teardown


def test_refusals_name_the_reason() -> None:
    assert "soft-caps the logits" in refusal(causal_lms(family_models.build("Gemma2"))[0])

    class OwnLoss(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Linear(4, 4)

    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match=r"holds none.*lightning_sft.losses.linear_cross_entropy"):
        FusedCrossEntropy().setup(trainer, OwnLoss(), "fit")
    with pytest.raises(ValueError, match="chunk_size"):
        FusedCrossEntropy(chunk_size=0)


def test_the_head_term_count_is_what_head_terms_gives() -> None:
    model = family_models.build("LLaMA")
    inject_lora(model, LoRAConfig(r=4, target_modules=["lm_head"]), torch.Generator().manual_seed(0))
    heads = [model.get_output_embeddings(), model.get_output_embeddings().base_layer]
    hidden = torch.randn(3, model.config.hidden_size)
    assert [head_term_count(head) for head in heads] == [2, 1]
    for head in heads:
        assert len(head_terms(head, hidden)[0]) == head_term_count(head)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"backend": "cuda"}, "`backend` must be one of"),
     ({"chunk_size": 8, "backend": "liger"}, "Leave chunk_size None")],
    ids=["unknown", "liger-with-chunk"],
)
def test_a_bad_backend_is_refused_at_construction(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        FusedCrossEntropy(**kwargs)


@pytest.mark.parametrize(
    ("lora_targets", "error", "match"),
    [(None, RuntimeError, r"got cpu tensors.*TRITON_INTERPRET=1"),
     (["q_proj", "lm_head"], ValueError, r"one term.*LoRA head")],
    ids=["cpu", "lora-head"],
)
def test_an_explicit_liger_backend_that_cannot_run_fails_in_setup_before_installing(
    tmp_path: Path, monkeypatch, lora_targets: list[str] | None, error: type, match: str
) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    module, fused = CausalLM(model="tiny-llama", lr=1e-2), FusedCrossEntropy(backend="liger")
    callbacks = ([LoRA(r=4, target_modules=lora_targets)] if lora_targets else []) + [fused]
    trainer = tiny_trainer(tmp_path, 1, callbacks)
    for callback in callbacks[:-1]:
        callback.setup(trainer, module, "fit")
    with pytest.raises(error, match=match):
        fused.setup(trainer, module, "fit")
    assert fused._fused is None and "forward" not in vars(module.model)
