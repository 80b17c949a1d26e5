"""Activation offloading (recipes.offload) on CPU through CopyTransfer: exact gradients, what moves and what
stays, the order backward brings blocks back in, and the refusals."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from lightning_sft.memory.tracker import HostCopies, LiveTensors
from lightning_sft.recipes import enable_gradient_checkpointing, offload_activations
from lightning_sft.recipes.offload import CopyTransfer

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(family: str, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    if family == "llama":
        config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                             num_attention_heads=4, num_key_value_heads=2, attention_dropout=dropout)
        return LlamaForCausalLM(config).train()
    config = GPT2Config(vocab_size=128, n_embd=32, n_layer=3, n_head=4, n_positions=64, resid_pdrop=dropout,
                        attn_pdrop=dropout, embd_pdrop=dropout)
    return GPT2LMHeadModel(config).train()


def _step(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(1)
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


class Recording(CopyTransfer):
    """CopyTransfer that logs what it moves: ("host", shape) per saved tensor, ("device", count) per fetch."""

    def __init__(self) -> None:
        self.log: list[tuple[str, Any]] = []

    def to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        self.log.append(("host", tuple(tensor.shape)))
        return super().to_host(tensor)

    def to_device(self, tensors: list[torch.Tensor], device: torch.device) -> tuple[list[torch.Tensor], Any]:
        self.log.append(("device", len(tensors)))
        return super().to_device(tensors, device)


class Block(nn.Module):
    """A residual MLP block that also saves a tensor every block is given (as rotary cos/sin are)."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 16))

    def forward(self, x: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(x) * shared


class Stack(nn.Module):
    def __init__(self, blocks: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(Block() for _ in range(blocks))

    def forward(self, x: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, shared)
        return x


def _stack_grads(model: Stack, x: torch.Tensor, shared: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(x, shared).square().sum().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_offloaded_steps_equal_the_plain_step_and_move_what_the_blocks_save(family: str, checkpointing: bool) -> None:
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    reference, model = _model(family, dropout=0.1), _model(family, dropout=0.1)
    if checkpointing:  # its recompute sums in another order than the plain step: compare with checkpointing alone
        enable_gradient_checkpointing(reference)
        enable_gradient_checkpointing(model)
    plain_loss, plain_grads = _step(reference, ids)
    blocks = model.model.layers if family == "llama" else model.transformer.h
    before = [vars(block).get("forward") for block in blocks]  # the checkpointed forwards, or none
    offloaded = offload_activations(model, "cpu", CopyTransfer(), min_bytes=0)
    assert len(offloaded.names) == 3
    loss, grads = _step(model, ids)
    assert loss == plain_loss
    assert grads.keys() == plain_grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], plain_grads[name], rtol=0, atol=0, msg=name)
    offloader = offloaded.offloader
    block_input = 2 * 24 * 32 * 4  # fp32 hidden states of one block
    if checkpointing:  # the checkpoints' block inputs, and nothing from inside the blocks
        assert offloader.moved_bytes == 3 * block_input
    else:
        assert offloader.moved_bytes > 3 * 5 * block_input
    assert offloader.host_peak == offloader.moved_bytes and offloader.host_bytes == 0  # all freed after backward
    offloaded.remove()
    assert [vars(block).get("forward") for block in blocks] == before


def test_the_device_keeps_only_what_lies_outside_the_blocks() -> None:
    """The live storages at the end of the forward pass: offloading frees what the blocks saved."""
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))

    def live_after_forward(offload: bool) -> int:
        model, host_copies = _model("llama"), HostCopies()
        if offload:
            offload_activations(model, "cpu", host_copies, min_bytes=0)
        tracker = host_copies.tracker = LiveTensors()
        with tracker:
            loss = model(input_ids=ids, labels=ids).loss
        live, moved = tracker.live, tracker.host_live
        loss.backward()
        assert (moved > 0) == offload
        return live

    plain, offloaded = live_after_forward(False), live_after_forward(True)
    assert offloaded < 0.45 * plain


def test_shared_tensors_move_once_and_weights_stay() -> None:
    model, x, shared = Stack(), torch.randn(8, 16, requires_grad=True), torch.rand(8, 16)
    expected = _stack_grads(model, x, shared)
    transfer = Recording()
    offloaded = offload_activations(model, "cpu", transfer, min_bytes=0)
    got = _stack_grads(model, x, shared)
    assert got.keys() == expected.keys() and got
    for name in got:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0)
    shapes = [shape for kind, shape in transfer.log if kind == "host"]  # whole storages, flat
    assert shapes and (64 * 16,) not in shapes  # no weight, no view of a weight
    assert shapes.count((8 * 16,)) == 4 + 1  # each block's input, and the shared tensor once
    fetches = [count for kind, count in transfer.log if kind == "device"]
    # Backward fetches the last block whole and the one before it ahead, then one block at a time; the shared
    # tensor, owned by the first block, is fetched alone by the three blocks that reuse it.
    assert fetches.count(1) == 3 and len([c for c in fetches if c > 1]) == 4
    assert offloaded.offloader.host_bytes == 0


def test_blocks_come_back_last_first_with_one_ahead() -> None:
    model, x, shared = Stack(), torch.randn(8, 16, requires_grad=True), torch.rand(8, 16)
    transfer = Recording()
    offload_activations(model, "cpu", transfer, min_bytes=0)
    order: list[tuple[str, int]] = []
    for index, layer in enumerate(model.layers):
        layer.register_full_backward_pre_hook(lambda module, grad, index=index: order.append(("backward", index)))
    out = model(x, shared).square().sum()
    transfer.log.clear()
    fetched: list[int] = []
    original = transfer.to_device

    def to_device(tensors: list[torch.Tensor], device: torch.device) -> tuple[list[torch.Tensor], Any]:
        if len(tensors) > 1:
            fetched.append(len(order))  # blocks whose backward had started when this group was fetched
        return original(tensors, device)

    transfer.to_device = to_device  # type: ignore[method-assign]
    out.backward()
    # Block 3's and block 2's groups are fetched as block 3's backward starts, then each group one block ahead.
    assert fetched == [1, 1, 2, 3]


def test_views_of_one_storage_move_once_and_a_small_slice_alone() -> None:
    """A linear saves a 2-D view of its 3-D input, which other ops save whole: one copy. A slice that is the
    smaller part of its storage (q of a fused qkv) moves by itself, not with the rest."""

    class Fused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv = nn.Linear(16, 48)
            self.out = nn.Linear(16, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            q, k, v = self.qkv(x.tanh()).split(16, dim=-1)
            return x + self.out(q * x.tanh())

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.layers = nn.ModuleList(Fused() for _ in range(2))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for layer in self.layers:
                x = layer(x)
            return x

    model, x = Model(), torch.randn(2, 8, 16, requires_grad=True)
    model(x).sum().backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    transfer = Recording()
    offload_activations(model, "cpu", transfer, min_bytes=0)
    model.zero_grad(set_to_none=True)
    model(x).sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=0, atol=0, msg=name)
    shapes = [shape for kind, shape in transfer.log if kind == "host"]
    assert shapes.count((2 * 8 * 48,)) == 0  # the qkv output is never copied whole
    assert shapes.count((2, 8, 16)) == 2  # q alone, once per block (saved by the product), a third of its storage


def test_small_tensors_no_grad_forwards_and_retained_graphs() -> None:
    model, x, shared = Stack(), torch.randn(8, 16, requires_grad=True), torch.rand(8, 16)
    expected = _stack_grads(model, x, shared)
    offloaded = offload_activations(model, "cpu", CopyTransfer(), min_bytes=8 * 64 * 4 + 1)
    assert _stack_grads(model, x, shared).keys() == expected.keys()
    assert offloaded.offloader.moved_bytes == 0  # every saved tensor is under min_bytes
    offloaded.remove()
    offloaded = offload_activations(model, "cpu", CopyTransfer(), min_bytes=0)
    with torch.no_grad():
        model(x, shared)
    assert offloaded.offloader.moved_bytes == 0
    model.zero_grad(set_to_none=True)
    loss = model(x, shared).square().sum()
    loss.backward(retain_graph=True)  # a second backward brings each tensor back again
    loss.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, 2 * expected[name], msg=name)


def test_refusals_leave_the_model_unchanged() -> None:
    model = Stack()
    with pytest.raises(ValueError, match="on cpu pass a `transfer`"):
        offload_activations(model, "cpu")
    with pytest.raises(ValueError, match="`min_bytes` must be an integer >= 0"):
        offload_activations(model, "cpu", CopyTransfer(), min_bytes=-1)
    with pytest.raises(ValueError, match="not an nn.ModuleList"):
        offload_activations(model, "cpu", CopyTransfer(), blocks=["nope"])
    assert all("forward" not in vars(layer) for layer in model.layers)
    first = offload_activations(model, "cpu", CopyTransfer())
    before = [vars(layer)["forward"] for layer in model.layers]
    with pytest.raises(ValueError, match="already installed on 'layers.0'"):
        offload_activations(model, "cpu", CopyTransfer())
    assert [vars(layer)["forward"] for layer in model.layers] == before
    first.remove()
    assert all("forward" not in vars(layer) for layer in model.layers)
    assert copy.deepcopy(model) is not None
