"""QLoRA: 4-bit (NF4/FP4) base layers from bitsandbytes on CPU, sparse blocks over them, the LoRA callback's
``quantize`` option, persistence, and refusals. Decoding and the sliced 4-bit product: test_nf4.py."""

from __future__ import annotations

import copy
import math
import sys
from collections.abc import Iterator

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from lightning_sft import (
    ContextualSparsity,
    LoRA,
    LoRAConfig,
    SparseFineTuning,
    inject_lora,
    load_adapter,
    load_from_checkpoint,
    lora_layers,
    merge_adapter,
    save_adapter,
)
from lightning_sft.adapters import base_fingerprint, quantization
from lightning_sft.adapters.lora_layer import LoRALinear
from lightning_sft.adapters.quantization import (
    dequantize_weight, is_quantized, quantize_base, quantized_bytes, quantized_layers,
)
from lightning_sft.anatomy import describe
from lightning_sft.kernels import nf4
from lightning_sft.sparsity import SparsityState, desparsify, sparsify

bnb = pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.usefixtures("one_thread", "eager")

# Widths that are multiples of 64: bitsandbytes 0.50's CPU kernel misreads rows that start inside a block.
CONFIG = dict(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64,
)


@pytest.fixture
def eager() -> Iterator[None]:
    """bitsandbytes decodes odd widths with a torch.compile'd function: compiling each shape costs seconds."""
    with torch.compiler.set_stance("force_eager"):
        yield


def _llama(seed: int = 0, family: str = "llama") -> nn.Module:
    torch.manual_seed(seed)
    if family == "qwen2":  # q/k/v carry biases
        return Qwen2ForCausalLM(Qwen2Config(**CONFIG)).eval()
    return LlamaForCausalLM(LlamaConfig(**CONFIG)).eval()


def _qlora(seed: int = 0, family: str = "llama", **kwargs) -> nn.Module:
    model = _llama(seed, family)
    inject_lora(model, LoRAConfig(r=4), torch.Generator().manual_seed(1))
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=torch.Generator().manual_seed(2)) * 0.1)
    quantize_base(model, **kwargs)
    return model


def _dense_twin(model: nn.Module) -> nn.Module:
    """The same model with every 4-bit layer replaced by an nn.Linear holding its dequantized weight."""
    twin = copy.deepcopy(model)
    for name, layer in quantized_layers(twin).items():
        dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        dense.weight = nn.Parameter(dequantize_weight(layer), requires_grad=False)
        if layer.bias is not None:
            dense.bias = layer.bias
        twin.set_submodule(name, dense)
    return twin


def _ids(seed: int = 0, size: tuple[int, int] = (2, 12)) -> torch.Tensor:
    return torch.randint(0, CONFIG["vocab_size"], size, generator=torch.Generator().manual_seed(seed))


# --- quantize_base ---------------------------------------------------------------------------------

def test_quantize_base_keeps_heads_biases_and_records_the_unquantized_fingerprint() -> None:
    model = _llama(family="qwen2")
    inject_lora(model, LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    fingerprint = base_fingerprint(model)
    bias = model.model.layers[0].self_attn.q_proj.base_layer.bias
    names = quantize_base(model)
    assert len(names) == 14 and "model.layers.0.self_attn.q_proj.base_layer" in names
    assert "model.layers.0.self_attn.k_proj" in names  # not adapted, quantized all the same
    assert type(model.lm_head) is nn.Linear and not any("lm_head" in n for n in names)
    layer = model.model.layers[0].self_attn.q_proj.base_layer
    assert is_quantized(layer) and layer.bias is bias and layer.bias.dtype == torch.float32
    assert base_fingerprint(model) == fingerprint
    assert base_fingerprint(_llama(family="qwen2", seed=1)) != fingerprint


@pytest.mark.parametrize("double_quant", [False, True])
def test_quantized_bytes_follow_the_memory_model(double_quant: bool) -> None:
    model = _llama().requires_grad_(False)
    dense = {n: m.weight.numel() * 4 for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}
    quantize_base(model, double_quant=double_quant)
    for name, layer in quantized_layers(model).items():
        params = layer.in_features * layer.out_features
        blocks = math.ceil(params / 64)
        scales = blocks + 4 * math.ceil(blocks / 256) + 4 if double_quant else 4 * blocks  # + the global offset
        tables = 16 * 4 + (256 * 4 if double_quant else 0)  # the code tables of the codes and of the scales
        assert quantized_bytes(layer) == math.ceil(params / 2) + scales + tables
        assert quantized_bytes(layer) - tables <= dense[name] * (0.5 + (1.5 if double_quant else 4) / 64) / 4


# --- forward and backward --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qlora_layer_matches_lora_over_the_dequantized_base(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(128, 64).to(dtype).requires_grad_(False)
    lora = LoRALinear(linear, r=4, alpha=8)
    with torch.no_grad():
        lora.lora_B.normal_(0, 0.1)
    holder = nn.Sequential(lora)
    quantize_base(holder)
    assert is_quantized(lora.base_layer) and lora.lora_A.dtype == torch.float32
    reference = _dense_twin(holder)[0]
    x = torch.randn(3, 5, 128, dtype=dtype, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    out, out_ref = lora(x), reference(x_ref)
    assert out.dtype == dtype
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out, out_ref, **tolerance)
    grad = torch.randn_like(out)
    out.backward(grad)
    out_ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, **tolerance)
    torch.testing.assert_close(lora.lora_A.grad, reference.lora_A.grad, **tolerance)
    torch.testing.assert_close(lora.lora_B.grad, reference.lora_B.grad, **tolerance)
    assert lora.base_layer.weight.grad is None and not lora.base_layer.weight.requires_grad


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_sparse_mlp_and_attention_over_a_4bit_base_match_the_dequantized_reference(family: str) -> None:
    model = _qlora(family=family)
    reference = _dense_twin(model)
    results = []
    for net in (model, reference):
        state = SparsityState()
        anatomy = describe(net)
        assert [b.name for b in anatomy.mlps] == [f"model.layers.{i}.mlp" for i in range(2)]
        assert [b.name for b in anatomy.attentions] == [f"model.layers.{i}.self_attn" for i in range(2)]
        sparsify(net, anatomy.mlps, [0.5, 0.5], state, "svd", rank=4)
        sparsify(net, anatomy.attentions, [0.5, 0.5], state, "svd", rank=4)
        ids = _ids()
        state.active, state.context_mask = True, torch.arange(12).expand(2, 12) < 8
        out = net(input_ids=ids, labels=ids)
        out.loss.backward()
        assert state.skipped_flops > 0
        results.append((out.logits, {n: p.grad for n, p in net.named_parameters() if p.requires_grad}))
        assert len(desparsify(net)) == 4
    (logits, grads), (logits_ref, grads_ref) = results
    torch.testing.assert_close(logits, logits_ref, rtol=1e-5, atol=1e-5)
    assert grads.keys() == grads_ref.keys() and len(grads) == 28
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-4, atol=1e-6)


# --- through a Trainer -----------------------------------------------------------------------------

class TinyLlama(pl.LightningModule):
    def __init__(self, seed: int = 0, lr: float = 1e-2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = _llama(seed).train()
        self.losses: list[float] = []

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self.net(input_ids=batch, labels=batch).loss
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


def _loader(n: int = 12) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(_ids(3, (n, 16)), batch_size=4)


def _trainer(root, steps: int, callbacks: list[pl.Callback], **kwargs) -> pl.Trainer:
    kwargs.setdefault("enable_checkpointing", False)
    return pl.Trainer(default_root_dir=root, max_steps=steps, accelerator="cpu", callbacks=callbacks, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, **kwargs)


def _adapters(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def test_callback_trains_a_4bit_base_resumes_exactly_and_saves_an_adapter_for_the_dense_base(tmp_path) -> None:
    pl.seed_everything(0)
    straight = TinyLlama()
    _trainer(tmp_path / "a", 9, [LoRA(r=4, quantize="nf4")]).fit(straight, _loader())
    assert len(quantized_layers(straight)) == 14 and len(lora_layers(straight)) == 14
    assert sum(straight.losses[-3:]) < sum(straight.losses[:3])

    pl.seed_everything(0)
    first = TinyLlama()
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=6, save_top_k=-1)
    _trainer(tmp_path / "b", 6, [LoRA(r=4, quantize="nf4"), ckpt], enable_checkpointing=True).fit(first, _loader())
    (path,) = list((tmp_path / "ckpt").glob("*.ckpt"))
    pl.seed_everything(123)
    resumed = TinyLlama()
    _trainer(tmp_path / "c", 9, [LoRA(r=4, quantize="nf4")]).fit(resumed, _loader(), ckpt_path=path)
    expected, got = _adapters(straight), _adapters(resumed)
    assert expected.keys() == got.keys() and len(got) == 28
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0)
    for name, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name

    loaded = load_from_checkpoint(TinyLlama, path)
    assert len(quantized_layers(loaded)) == 14
    for name, value in first.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name

    with pytest.raises(ValueError, match="4-bit base and this run has a dense one"):
        _trainer(tmp_path / "d", 9, [LoRA(r=4)]).fit(TinyLlama(), _loader(), ckpt_path=path)

    save_adapter(straight, tmp_path / "adapter")
    dense_base = _llama(0)
    assert load_adapter(dense_base, tmp_path / "adapter")  # the fingerprint of the unquantized base matches
    with pytest.raises(ValueError, match="different base model"):
        load_adapter(_llama(1), tmp_path / "adapter")
    ids = _ids()
    logits = dense_base(input_ids=ids).logits
    # The same adapter over the 4-bit base: close, up to the quantization error.
    quantized_logits = straight.net(input_ids=ids).logits
    assert torch.nn.functional.cosine_similarity(logits.flatten(), quantized_logits.flatten(), 0) > 0.99
    peft = pytest.importorskip("peft")
    peft_model = peft.PeftModel.from_pretrained(_llama(0), tmp_path / "adapter")
    torch.testing.assert_close(peft_model(input_ids=ids).logits, logits, rtol=0, atol=1e-5)


def test_sparse_training_steps_decode_only_the_selected_rows_and_columns(tmp_path, monkeypatch) -> None:
    decoded: list[int] = []
    original_decode, original_matmul = nf4.decode, bnb.matmul_4bit

    def counting_decode(packed, rows=None, cols=None, **kwargs):
        out = original_decode(packed, rows, cols, **kwargs)
        decoded.append(out.numel())
        return out

    def forbidden(*args, **kwargs):
        raise AssertionError("a whole 4-bit weight was decoded during a sparse step")

    def empty_only_matmul(a, *args, **kwargs):  # the dense share of a projection: no token at all here
        if a.numel():
            forbidden()
        return original_matmul(a, *args, **kwargs)

    class Guard(pl.Callback):
        def on_train_batch_start(self, *args) -> None:
            monkeypatch.setattr(nf4, "decode", counting_decode)
            monkeypatch.setattr(quantization, "dequantize_weight", forbidden)
            monkeypatch.setattr(bnb.functional, "dequantize_4bit", forbidden)
            monkeypatch.setattr(bnb, "matmul_4bit", empty_only_matmul)

        def on_train_batch_end(self, *args) -> None:
            monkeypatch.undo()

    sparsity = ContextualSparsity(
        strategy="svd", mlp_sparsity=0.5, attn_sparsity=0.5, dense_layers=(), dense_warmup=0, calibration_steps=0,
        estimator_rank=4, token_mask_fn=lambda batch: torch.ones(batch.shape, dtype=torch.bool),
    )
    module = TinyLlama()
    _trainer(tmp_path, 2, [LoRA(r=4, quantize="nf4"), sparsity, Guard()]).fit(module, _loader())
    assert len(module.losses) == 2 and all(math.isfinite(loss) for loss in module.losses)
    sizes = [layer.in_features * layer.out_features for layer in quantized_layers(module).values()]
    # Per step and layer: half of gate/up rows and down columns, half of the kv channels of q/k/v/o (forward,
    # and backward again where the slice is not kept): never more than the whole weights once per pass.
    assert decoded and sum(decoded) <= 2 * 2 * 0.5 * sum(sizes)
    assert max(decoded) <= 0.5 * max(sizes)


# --- refusals --------------------------------------------------------------------------------------

def _snapshot(model: nn.Module) -> dict[str, object]:
    return {name: type(module) for name, module in model.named_modules()}


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(quant_type="int4"), ValueError, "'nf4', 'fp4'"),
        (dict(compute_dtype=torch.int8), ValueError, "compute_dtype"),
        (dict(double_quant="yes"), ValueError, "double_quant"),
        (dict(target_modules=["nothing"]), ValueError, "selects no linear layer"),
    ],
)
def test_bad_arguments_leave_the_model_unchanged(kwargs: dict, error: type, match: str) -> None:
    model = _llama().requires_grad_(False)
    before = _snapshot(model)
    with pytest.raises(error, match=match):
        quantize_base(model, **kwargs)
    assert _snapshot(model) == before


def test_models_it_cannot_quantize_are_refused_before_any_change(monkeypatch) -> None:
    trainable = _llama()
    before = _snapshot(trainable)
    with pytest.raises(ValueError, match="requires grad: 4-bit weights cannot be trained"):
        quantize_base(trainable)
    assert _snapshot(trainable) == before

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=64, n_layer=1, n_head=4, n_positions=32))
    gpt2.requires_grad_(False)
    before = _snapshot(gpt2)
    with pytest.raises(TypeError, match="Conv1D"):
        quantize_base(gpt2)
    assert _snapshot(gpt2) == before

    model = _qlora()
    before = _snapshot(model)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_base(model)
    with pytest.raises(RuntimeError, match="4-bit \\(QLoRA\\) base"):
        merge_adapter(model)
    assert _snapshot(model) == before and not any(layer.merged for layer in lora_layers(model).values())

    # bitsandbytes 0.50.0-0.50.1's CPU decoder misread rows of 96 entries (not a multiple of the block size 64);
    # 0.50.2 reads them right. Where it misreads, the layer is refused before any change; where it reads them
    # right, the layer quantizes and decodes as ours does.
    misread = nn.Sequential(nn.Linear(64, 8), nn.Linear(96, 8)).requires_grad_(False)
    before = _snapshot(misread)
    with monkeypatch.context() as patch:
        patch.setattr(quantization, "_cpu_kernel_agrees", lambda *args: in_features_of(args) != 96)
        with pytest.raises(ValueError, match="in_features=96 wrongly"):
            quantize_base(misread)
    assert _snapshot(misread) == before
    import bitsandbytes

    if quantization._cpu_kernel_agrees(bitsandbytes, 96, "nf4", torch.float32):
        quantize_base(misread)
        assert all(is_quantized(layer) for layer in misread)
        x = torch.randn(3, 96)
        expected = torch.nn.functional.linear(x, dequantize_weight(misread[1]), misread[1].bias)
        torch.testing.assert_close(misread[1](x), expected, rtol=1e-5, atol=1e-5)  # the CPU kernel reads 96 right
    else:
        with pytest.raises(ValueError, match="in_features=96 wrongly"):
            quantize_base(misread)
        assert _snapshot(misread) == before

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    plain = _llama().requires_grad_(False)
    before = _snapshot(plain)
    with pytest.raises(ImportError, match=r"pip install 'bitsandbytes>=0.50'"):
        quantize_base(plain)
    assert _snapshot(plain) == before


def test_callback_refuses_a_bad_quantize_value_and_sparse_finetuning(tmp_path) -> None:
    with pytest.raises(ValueError, match="`quantize` must be one of 'nf4', 'fp4'"):
        LoRA(quantize="int4")
    module = TinyLlama()
    before = _snapshot(module)
    with pytest.raises(ValueError, match="LoRA cannot run with SparseFineTuning: quantize='nf4': sparse fine-tuning trains entries"):
        _trainer(tmp_path, 1, [LoRA(quantize="nf4"), SparseFineTuning(density=0.1)]).fit(module, _loader())
    assert _snapshot(module) == before


def test_importing_bitsandbytes_after_us_prints_no_missing_hub_kernel_line() -> None:
    pytest.importorskip("bitsandbytes")
    import subprocess

    def stderr(code: str) -> str:
        return subprocess.run([sys.executable, "-c", f"import logging; logging.basicConfig(); {code}"],
                              capture_output=True, text=True, timeout=300).stderr

    if "kernels-community" not in stderr("import bitsandbytes"):
        pytest.skip("this bitsandbytes build does not log the missing hub kernel on this CPU")
    assert "kernels-community" not in stderr("import lightning_sft.adapters, bitsandbytes")


def in_features_of(check_args: tuple) -> int:
    """The ``in_features`` argument of ``quantization._cpu_kernel_agrees(bnb, in_features, quant_type, dtype)``."""
    return check_args[1]

