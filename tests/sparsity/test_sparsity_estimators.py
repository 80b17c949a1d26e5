"""Tests for the contextual-sparsity estimators, their cache, the GQA index maps and the schedules."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from lightning_sft.sparsity import (
    PRESETS,
    ChannelEstimator,
    GatedMLPBlock,
    MLPBlock,
    QKBlock,
    StaleCacheError,
    SVDCache,
    SVDEstimator,
    VBlock,
    attention_indices,
    attention_projection_flops,
    available_strategies,
    build_estimator,
    dense_warmup_steps,
    expand_kv_channels,
    get_strategy,
    is_dense_step,
    kept_channels,
    mlp_flops,
    preset,
    recall,
    reference_layer,
    register_strategy,
    resolve_layer_sparsity,
    svd_factors,
)
from lightning_sft.sparsity import estimators as estimators_module
from lightning_sft.sparsity import svd_cache as svd_cache_module

HIDDEN, INTER = 32, 48
N_HEADS, N_KV, HEAD_DIM = 8, 2, 4
GROUP = N_HEADS // N_KV


def _gated_block(seed: int = 0) -> GatedMLPBlock:
    gen = torch.Generator().manual_seed(seed)
    return GatedMLPBlock(torch.randn(INTER, HIDDEN, generator=gen), torch.randn(INTER, HIDDEN, generator=gen))


def _hidden(seed: int = 1, batch: int = 4, seq: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states and a context mask whose samples have different numbers of context tokens."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seq, HIDDEN, generator=gen)
    mask = torch.zeros(batch, seq, dtype=torch.bool)
    for b in range(batch):
        mask[b, : 3 + 2 * b] = True
    return x, mask


def _attention_weights(seed: int = 2) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    wq = torch.randn(N_HEADS * HEAD_DIM, HIDDEN, generator=gen)
    wk = torch.randn(N_KV * HEAD_DIM, HIDDEN, generator=gen)
    wv = torch.randn(N_KV * HEAD_DIM, HIDDEN, generator=gen)
    wo = torch.randn(HIDDEN, N_HEADS * HEAD_DIM, generator=gen)
    return wq, wk, wv, wo


def _top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    return torch.topk(scores, k).indices.sort().values


# -- strategies --------------------------------------------------------------------------------------


def test_none_and_full_oracle_select_every_channel() -> None:
    block = _gated_block()
    x, mask = _hidden()
    everything = torch.arange(INTER)
    assert torch.equal(build_estimator("none", block).select(x, 5, mask), everything)
    assert torch.equal(build_estimator("oracle", block).select(x, INTER, mask), everything)


def test_oracle_is_the_exact_top_k_of_true_activation_norms() -> None:
    block = _gated_block()
    x, mask = _hidden()
    pooled = torch.stack([x[b][mask[b]].mean(dim=0) for b in range(x.shape[0])])
    norms = (F.silu(pooled @ block.gate.T) * (pooled @ block.up.T)).norm(dim=0)
    oracle = build_estimator("oracle", block)
    for k in (1, 7, 24, 47):
        assert torch.equal(oracle.select(x, k, mask), _top_k(norms, k))

    fc1, bias = torch.randn(INTER, HIDDEN), torch.randn(INTER)
    plain = build_estimator("oracle", MLPBlock(fc1, "gelu", bias))
    assert torch.equal(plain.select(x, 12, mask), _top_k(F.gelu(pooled @ fc1.T + bias).norm(dim=0), 12))

    wq, wk, wv, _ = _attention_weights()
    tokens = x[mask]
    q_norms = (tokens @ wq.T).reshape(-1, N_KV, GROUP, HEAD_DIM).square().sum(dim=(0, 2)).sqrt()
    k_norms = (tokens @ wk.T).reshape(-1, N_KV, HEAD_DIM).norm(dim=0)
    qk = build_estimator("oracle", QKBlock(wq, wk, N_HEADS, N_KV))
    assert torch.equal(qk.select(x, 3, mask), _top_k((q_norms * k_norms).reshape(-1), 3))
    v = build_estimator("oracle", VBlock(wv, N_KV))
    assert torch.equal(v.select(x, 5, mask), _top_k((tokens @ wv.T).norm(dim=0), 5))


def test_output_tokens_and_padding_do_not_steer_the_selection() -> None:
    block = _gated_block()
    x, mask = _hidden()
    changed = x.clone()
    changed[~mask] = 100.0
    for strategy in ("svd", "oracle"):
        estimator = build_estimator(strategy, block)
        assert torch.equal(estimator.select(x, 10, mask), estimator.select(changed, 10, mask))
    with pytest.raises(ValueError, match="bool tensor"):
        build_estimator("oracle", block).select(x, 10, mask.long())
    with pytest.raises(ValueError, match="no token"):
        build_estimator("oracle", block).select(x, 10, torch.zeros_like(mask))


def test_svd_at_full_rank_equals_the_oracle() -> None:
    block = _gated_block()
    x, mask = _hidden()
    oracle, svd = build_estimator("oracle", block), build_estimator("svd", block, rank=HIDDEN)
    torch.testing.assert_close(svd.scores(x, mask), oracle.scores(x, mask), rtol=1e-4, atol=1e-4)
    for k in (1, 12, 24, 40):
        assert torch.equal(svd.select(x, k, mask), oracle.select(x, k, mask))

    # Attention uses the Gram-matrix shortcut, biases included (Qwen2 has q/k/v biases).
    wq, wk, wv, _ = _attention_weights()
    for block in (
        QKBlock(wq, wk, N_HEADS, N_KV, q_bias=torch.randn(wq.shape[0]), k_bias=torch.randn(wk.shape[0])),
        VBlock(wv, N_KV, v_bias=torch.randn(wv.shape[0])),
    ):
        exact = build_estimator("oracle", block).scores(x, mask)
        approx = build_estimator("svd", block, rank=HIDDEN).scores(x, mask)
        torch.testing.assert_close(approx, exact, rtol=1e-3, atol=1e-2)


def test_svd_factors_follow_the_documented_convention() -> None:
    weight = torch.randn(20, 12)
    factors = svd_factors(weight, 12)
    assert factors.A.shape == (12, 12) and factors.B.shape == (12, 20) and factors.A.dtype == torch.float32
    torch.testing.assert_close(factors.A @ factors.B, weight.T, rtol=1e-4, atol=1e-4)
    assert svd_factors(weight, 100).rank == 12  # clamped to min(out, in)
    u, s, vh = torch.linalg.svd(weight.T, full_matrices=False)
    torch.testing.assert_close(svd_factors(weight, 3).A @ svd_factors(weight, 3).B, (u[:, :3] * s[:3]) @ vh[:3])


def _capture_layer_inputs(layer: int) -> tuple[torch.nn.Module, dict[str, torch.Tensor], torch.Tensor]:
    """Real hidden states entering one layer's MLP and attention of the shipped pretrained base."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lightning_sft.assets import SHIPPED_MODELS

    path = SHIPPED_MODELS["sft-llama-5m"]
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    texts = [
        "The quick brown fox jumps over the lazy dog. This module provides access to some variables.",
        "Return the absolute value of a number. The argument may be an integer or a floating point number.",
        "38 + 47 = 85\n91 - 26 = 65\n47 > 38\n197, 198, 199, 200",
        "Question: What is 12 plus 30?\nAnswer: 42",
        "class Foo:\n    def bar(self, x):\n        return x * 2  # double it",
        "Raise a ValueError if the string is not a valid identifier, and log a warning otherwise.",
        "The with statement is used to wrap the execution of a block with methods defined by a context manager.",
        "Open file and return a stream. Raise OSError upon failure.",
    ]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    decoder = model.model.layers[layer]
    captured: dict[str, torch.Tensor] = {}
    hooks = [
        decoder.mlp.register_forward_hook(lambda m, args, out: captured.__setitem__("mlp", args[0])),
        decoder.input_layernorm.register_forward_hook(lambda m, args, out: captured.__setitem__("attn", out)),
    ]
    with torch.no_grad():
        model(**batch)
    for hook in hooks:
        hook.remove()
    return decoder, captured, batch["attention_mask"].bool()


def test_svd_rank8_recall_on_the_pretrained_base() -> None:
    decoder, hidden, mask = _capture_layer_inputs(layer=2)
    mlp, attn, config = decoder.mlp, decoder.self_attn, decoder.self_attn.config
    blocks = {
        "mlp": (GatedMLPBlock(mlp.gate_proj.weight, mlp.up_proj.weight), hidden["mlp"]),
        "qk": (QKBlock(attn.q_proj.weight, attn.k_proj.weight, config.num_attention_heads,
                       config.num_key_value_heads), hidden["attn"]),
    }
    measured: dict[tuple[str, str], float] = {}
    for part, (block, x) in blocks.items():
        k = kept_channels(block.num_channels, 0.5)
        oracle = build_estimator("oracle", block).select(x, k, mask)
        for strategy in ("svd", "norm", "random"):
            measured[part, strategy] = recall(build_estimator(strategy, block).select(x, k, mask), oracle)
    print("recall vs oracle at 50% sparsity, layer 2 of sft-llama-5m:", measured)
    # Measured (torch 2.13 CPU): mlp svd 0.844, norm 0.781, random 0.517; qk svd 0.938, norm 0.906, random 0.547.
    assert measured["mlp", "svd"] >= 0.78
    assert measured["qk", "svd"] >= 0.88
    assert measured["mlp", "svd"] > measured["mlp", "norm"] > measured["mlp", "random"] + 0.2
    assert measured["qk", "svd"] >= measured["qk", "norm"] > measured["qk", "random"] + 0.2


def test_selection_is_deterministic_with_ties_broken_by_index() -> None:
    class Constant(ChannelEstimator):
        def scores(self, x: torch.Tensor, context_mask: torch.Tensor | None = None) -> torch.Tensor:
            return torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0, 3.0])

    estimator = Constant()
    estimator.prepare(MLPBlock(torch.randn(6, 4)))
    assert estimator.select(torch.randn(2, 4), 3).tolist() == [1, 2, 4]
    assert estimator.select(torch.randn(2, 4), 5).tolist() == [1, 2, 3, 4, 5]

    x, _ = _hidden()
    first = build_estimator("random", _gated_block(), seed=7)
    second = build_estimator("random", _gated_block(), seed=7)
    picks = [first.select(x, 10) for _ in range(3)]
    assert all(torch.equal(a, second.select(x, 10)) for a in picks)
    assert not torch.equal(picks[0], picks[1])  # a fresh draw every step
    for idx in picks:
        assert idx.dtype == torch.long and torch.equal(idx, idx.unique())


def test_k_and_block_validation() -> None:
    estimator = build_estimator("oracle", _gated_block())
    x, mask = _hidden()
    for k in (0, INTER + 1, 2.5, True):
        with pytest.raises(ValueError, match="k must be an integer"):
            estimator.select(x, k, mask)
    with pytest.raises(RuntimeError, match="prepare"):
        SVDEstimator().select(x, 3)
    with pytest.raises(ValueError, match="one shape"):
        GatedMLPBlock(torch.randn(4, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        QKBlock(torch.randn(24, 8), torch.randn(8, 8), num_heads=6, num_kv_heads=4)
    with pytest.raises(ValueError, match="Unknown activation"):
        MLPBlock(torch.randn(4, 3), "swishy")


# -- grouped-query attention index maps ----------------------------------------------------------------


def _kv_mask(kv_idx: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros(N_KV * HEAD_DIM, dtype=torch.bool)
    mask[kv_idx] = True
    return mask.reshape(N_KV, HEAD_DIM)


def _reference_scores(q: torch.Tensor, k: torch.Tensor, qk_idx: torch.Tensor) -> torch.Tensor:
    """Full q/k with the dims of unselected kv channels zeroed, every query head against its kv head."""
    mask = _kv_mask(qk_idx)
    q_heads = q.reshape(-1, N_HEADS, HEAD_DIM) * mask.repeat_interleave(GROUP, dim=0)
    k_heads = k.reshape(-1, N_KV, HEAD_DIM) * mask
    return torch.stack([q_heads[:, h] @ k_heads[:, h // GROUP].T for h in range(N_HEADS)])


def _scores_from_sliced(
    q_sel: torch.Tensor, q_idx: torch.Tensor, k_sel: torch.Tensor, k_idx: torch.Tensor
) -> torch.Tensor:
    """What an implementation computes from sliced projections placed back at their indices."""
    q = q_sel.new_zeros(q_sel.shape[0], N_HEADS * HEAD_DIM).index_copy(1, q_idx, q_sel)
    k = k_sel.new_zeros(k_sel.shape[0], N_KV * HEAD_DIM).index_copy(1, k_idx, k_sel)
    q_heads, k_heads = q.reshape(-1, N_HEADS, HEAD_DIM), k.reshape(-1, N_KV, HEAD_DIM)
    return torch.stack([q_heads[:, h] @ k_heads[:, h // GROUP].T for h in range(N_HEADS)])


def test_gqa_index_maps_pair_query_and_key_dims() -> None:
    wq, wk, wv, _ = _attention_weights()
    x, mask = _hidden()
    tokens = x[0]
    qk_idx = build_estimator("oracle", QKBlock(wq, wk, N_HEADS, N_KV)).select(x, 3, mask)
    v_idx = build_estimator("oracle", VBlock(wv, N_KV)).select(x, 5, mask)
    idx = attention_indices(qk_idx, v_idx, N_HEADS, N_KV, HEAD_DIM)
    assert torch.equal(idx.k, qk_idx) and torch.equal(idx.v, v_idx)
    assert idx.q.numel() == GROUP * qk_idx.numel() and idx.o.numel() == GROUP * v_idx.numel()

    # The products in float64: sliced and masked-full sums add the same terms in another order, which
    # fp32 rounds apart by up to ~n*eps*sum|terms| (3e-5 seen); an index map error moves scores by O(1).
    tokens, wq, wk = tokens.double(), wq.double(), wk.double()
    q_sel, k_sel = tokens @ wq[idx.q].T, tokens @ wk[idx.k].T  # sliced frozen weights
    reference = _reference_scores(tokens @ wq.T, tokens @ wk.T, qk_idx)
    torch.testing.assert_close(_scores_from_sliced(q_sel, idx.q, k_sel, idx.k), reference)
    # Compact per-head products: each query head's kept dims are exactly its kv head's kept dims.
    for h in range(N_HEADS):
        q_cols, k_cols = idx.q // HEAD_DIM == h, idx.k // HEAD_DIM == h // GROUP
        assert torch.equal(idx.q[q_cols] % HEAD_DIM, idx.k[k_cols] % HEAD_DIM)
        torch.testing.assert_close(q_sel[:, q_cols] @ k_sel[:, k_cols].T, reference[h])


def test_naive_flat_or_interleaved_pairing_fails_the_same_check() -> None:
    wq, wk, _, _ = _attention_weights()
    x, mask = _hidden()
    tokens = x[0]
    qk_idx = build_estimator("oracle", QKBlock(wq, wk, N_HEADS, N_KV)).select(x, 3, mask)
    reference = _reference_scores(tokens @ wq.T, tokens @ wk.T, qk_idx)
    k_sel = tokens @ wk[qk_idx].T
    flat = qk_idx  # the same flat indices on both sides
    interleaved = (qk_idx[:, None] * GROUP + torch.arange(GROUP)).reshape(-1).sort().values  # the reference's map
    for wrong in (flat, interleaved):
        scores = _scores_from_sliced(tokens @ wq[wrong].T, wrong, k_sel, qk_idx)
        assert not torch.allclose(scores, reference)


def test_o_proj_columns_follow_the_v_selection_of_each_group() -> None:
    wq, wk, wv, wo = _attention_weights()
    x, mask = _hidden()
    tokens = x[0]
    v_idx = build_estimator("oracle", VBlock(wv, N_KV)).select(x, 5, mask)
    idx = attention_indices(v_idx, v_idx, N_HEADS, N_KV, HEAD_DIM)
    kept = {(int(c) // HEAD_DIM, int(c) % HEAD_DIM) for c in v_idx}
    expected = [h * HEAD_DIM + d for h in range(N_HEADS) for d in range(HEAD_DIM) if (h // GROUP, d) in kept]
    assert idx.o.tolist() == expected

    probs = torch.softmax(torch.randn(N_HEADS, tokens.shape[0], tokens.shape[0]), dim=-1)
    v_heads = ((tokens @ wv.T).reshape(-1, N_KV, HEAD_DIM) * _kv_mask(v_idx))
    attn_out = torch.cat([probs[h] @ v_heads[:, h // GROUP] for h in range(N_HEADS)], dim=1)
    reference = attn_out @ wo.T
    v_sel = tokens @ wv[idx.v].T
    position = {int(c): i for i, c in enumerate(idx.v)}
    compact = torch.stack(
        [probs[int(c) // HEAD_DIM] @ v_sel[:, position[int(c) // HEAD_DIM // GROUP * HEAD_DIM + int(c) % HEAD_DIM]]
         for c in idx.o],
        dim=1,
    )
    torch.testing.assert_close(compact @ wo[:, idx.o].T, reference, rtol=1e-4, atol=1e-4)


def _rotate_half_rope(heads: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    half = heads.shape[-1] // 2
    angles = positions[:, None] / 10000 ** (torch.arange(half) / half)
    cos, sin = torch.cat([angles.cos()] * 2, -1)[:, None], torch.cat([angles.sin()] * 2, -1)[:, None]
    rotated = torch.cat([-heads[..., half:], heads[..., :half]], dim=-1)
    return heads * cos + rotated * sin


def test_rotary_pairs_and_balanced_heads_structure_the_selection() -> None:
    wq, wk, _, _ = _attention_weights()
    x, mask = _hidden()
    paired = build_estimator("oracle", QKBlock(wq, wk, N_HEADS, N_KV, rotary_pairs=True)).select(x, 4, mask)
    plain = build_estimator("oracle", QKBlock(wq, wk, N_HEADS, N_KV)).select(x, 3, mask)
    positions = torch.arange(6, dtype=torch.float32)
    for kv_idx, closed in ((paired, True), (plain, False)):
        kept = _kv_mask(kv_idx)
        k = torch.randn(6, N_KV, HEAD_DIM) * kept
        leaked = _rotate_half_rope(k, positions) * ~kept
        assert bool(leaked.abs().max() == 0) is closed  # pairs stay inside the kept dims after RoPE

    balanced = build_estimator("oracle", QKBlock(wq, wk, N_HEADS, N_KV, balanced=True)).select(x, 4, mask)
    assert torch.bincount(balanced // HEAD_DIM, minlength=N_KV).tolist() == [2, 2]
    with pytest.raises(ValueError, match="multiple of 2"):
        build_estimator("oracle", QKBlock(wq, wk, N_HEADS, N_KV, balanced=True)).select(x, 3, mask)
    with pytest.raises(ValueError, match="outside"):
        expand_kv_channels(torch.tensor([8]), N_HEADS, N_KV, HEAD_DIM)


# -- registry ----------------------------------------------------------------------------------------


def test_custom_strategy_registration_and_unknown_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(estimators_module, "_STRATEGIES", dict(estimators_module._STRATEGIES))

    class LowestChannels(ChannelEstimator):
        def __init__(self, offset: float = 0.0) -> None:
            self.offset = offset

        def scores(self, x: torch.Tensor, context_mask: torch.Tensor | None = None) -> torch.Tensor:
            return -torch.arange(self.block.num_channels, dtype=torch.float32) + self.offset

    register_strategy("lowest", LowestChannels)
    assert "lowest" in available_strategies() and get_strategy("lowest") is LowestChannels
    estimator = build_estimator("lowest", _gated_block(), offset=1.0)
    assert estimator.offset == 1.0 and estimator.select(torch.randn(2, HIDDEN), 4).tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="already registered"):
        register_strategy("lowest", LowestChannels)
    register_strategy("lowest", LowestChannels, overwrite=True)
    with pytest.raises(ValueError, match=r"'svdd'.*valid: lowest, none, norm, oracle, random, svd"):
        get_strategy("svdd")
    with pytest.raises(ValueError, match="non-empty"):
        register_strategy("", LowestChannels)


# -- cache -------------------------------------------------------------------------------------------


def test_cache_builds_once_and_reloads_the_same_factors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    weight = torch.randn(INTER, HIDDEN)
    cache = SVDCache(tmp_path)
    built = cache.load_or_build("layers.0.mlp.gate", weight, 8)
    files = list(tmp_path.iterdir())
    assert [f.suffix for f in files] == [".safetensors"]

    def no_svd(*args: object) -> None:
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(svd_cache_module, "svd_factors", no_svd)
    loaded = SVDCache(tmp_path).load_or_build("layers.0.mlp.gate", weight, 8)
    assert torch.equal(loaded.A, built.A) and torch.equal(loaded.B, built.B)
    # The estimator goes through the cache too, keyed by layer name.
    block = GatedMLPBlock(weight, weight.flip(0))
    monkeypatch.undo()
    SVDEstimator(cache=tmp_path).prepare(block, "layers.0.mlp")
    monkeypatch.setattr(svd_cache_module, "svd_factors", no_svd)
    SVDEstimator(cache=tmp_path).prepare(block, "layers.0.mlp")
    with pytest.raises(ValueError, match="unique layer name"):
        SVDEstimator(cache=tmp_path).prepare(block)


def test_stale_cache_is_refused_or_rebuilt_on_request(tmp_path: Path) -> None:
    weight = torch.randn(INTER, HIDDEN)
    SVDCache(tmp_path).load_or_build("layers.0.mlp.up", weight, 8)
    retrained = weight + 0.01
    with pytest.raises(StaleCacheError, match="Stale SVD estimator cache.*different 'layers.0.mlp.up' weight"):
        SVDCache(tmp_path).load_or_build("layers.0.mlp.up", retrained, 8)
    rebuilt = SVDCache(tmp_path, rebuild_stale=True).load_or_build("layers.0.mlp.up", retrained, 8)
    torch.testing.assert_close(rebuilt.A @ rebuilt.B, svd_factors(retrained, 8).A @ svd_factors(retrained, 8).B)
    SVDCache(tmp_path).load_or_build("layers.0.mlp.up", retrained, 8)  # now current: no error

    path = SVDCache(tmp_path).path("layers.0.mlp.up", 8)
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="unreadable"):
        SVDCache(tmp_path).load_or_build("layers.0.mlp.up", retrained, 8)


def test_cache_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash_mid_write(tensors: dict, filename: str, metadata: dict) -> None:
        Path(filename).write_bytes(b"half a file")
        raise RuntimeError("disk full")

    monkeypatch.setattr(svd_cache_module, "save_file", crash_mid_write)
    with pytest.raises(RuntimeError, match="disk full"):
        SVDCache(tmp_path / "cache").load_or_build("layers.0.mlp.gate", torch.randn(8, 4), 2)
    assert list((tmp_path / "cache").iterdir()) == []


# -- schedule ----------------------------------------------------------------------------------------


def test_presets_resolve_per_layer() -> None:
    mlp, attn = preset("llama3-8b-math10k", 32)
    assert mlp == [0.99 if 3 <= i <= 30 else 0.0 for i in range(32)]
    assert attn == [0.75 if 14 <= i <= 29 and i not in (20, 24) else 0.0 for i in range(32)]
    mlp, attn = preset("llama3-8b-commonsense", 32)
    assert mlp == [0.97 if 17 <= i <= 30 else 0.0 for i in range(32)]
    assert attn == [0.2 if 17 <= i <= 29 and i not in (20, 24) else 0.0 for i in range(32)]
    assert preset("llama2-7b", 32) == preset("llama2-7b-math10k", 32)
    assert preset("llama2-7b", 32)[0] == [0.9 if 13 <= i <= 29 else 0.0 for i in range(32)]
    assert resolve_layer_sparsity("llama3-8b-math10k", 32, part="attn") == preset("llama3-8b-math10k", 32)[1]


def test_presets_rescale_to_other_depths() -> None:
    assert preset("llama3-8b-math10k", 6) == ([0.0, 0.99, 0.99, 0.99, 0.99, 0.0], [0.0, 0.0, 0.0, 0.75, 0.75, 0.0])
    for name in PRESETS:
        for depth in (1, 2, 6, 12, 40, 80):
            mlp, attn = preset(name, depth)
            assert len(mlp) == len(attn) == depth and mlp[0] == mlp[-1] == attn[0] == attn[-1] == 0.0
    assert [reference_layer(i, 64, 32) for i in (0, 1, 2, 62, 63)] == [0, 0, 1, 31, 31]
    # A deeper model keeps the same fraction of sparse layers, roughly.
    assert abs(sum(v > 0 for v in preset("llama3-8b-math10k", 64)[0]) / 64 - 28 / 32) < 0.05


def test_layer_specs_and_dense_layers() -> None:
    assert resolve_layer_sparsity(0.5, 4) == [0.5] * 4
    assert resolve_layer_sparsity(0.5, 4, dense_layers=[0, -1]) == [0.0, 0.5, 0.5, 0.0]
    assert resolve_layer_sparsity({"1-2": 0.9, 3: 0.3, "4": 0.1}, 6) == [0.0, 0.9, 0.9, 0.3, 0.1, 0.0]
    bad_specs = [
        (1.0, "in \\[0, 1\\)"),
        (-0.1, "in \\[0, 1\\)"),
        (True, "in \\[0, 1\\)"),
        ("llama9", "valid: llama2-7b"),
        ({"0-3": 0.5, 2: 0.5}, "set by both"),
        ({"5-9": 0.5}, "outside layers 0-5"),
        ({"a-b": 0.5}, "Invalid layer key"),
        ({1: 1.5}, "in \\[0, 1\\)"),
    ]
    for spec, message in bad_specs:
        with pytest.raises(ValueError, match=message):
            resolve_layer_sparsity(spec, 6)
    with pytest.raises(ValueError, match="dense_layers"):
        resolve_layer_sparsity(0.5, 6, dense_layers=[6])
    with pytest.raises(ValueError, match="part"):
        resolve_layer_sparsity(0.5, 6, part="ffn")
    with pytest.raises(ValueError, match="num_layers"):
        resolve_layer_sparsity(0.5, 0)


def test_kept_channels_and_dense_warmup() -> None:
    assert kept_channels(704, 0.5) == 352 and kept_channels(14336, 0.99) == int(14336 * (1 - 0.99))
    assert kept_channels(10, 0.95) == 1  # never 0
    assert kept_channels(128, 0.7, multiple_of=8) == 32 and kept_channels(128, 0.99, multiple_of=8) == 8
    with pytest.raises(ValueError):
        kept_channels(10, 1.0)
    with pytest.raises(ValueError, match="multiple_of"):
        kept_channels(10, 0.5, multiple_of=4)

    assert [is_dense_step(s, 100, 0.05) for s in (0, 4, 5, 99)] == [True, True, False, False]
    assert dense_warmup_steps(1000, 0.05) == 50 and dense_warmup_steps(None, 3) == 3
    assert not is_dense_step(0, None, 0.0) and is_dense_step(2, None, 3) and not is_dense_step(3, None, 3)
    for total, warmup, message in ((None, 0.05, "total number of steps"), (100, 1.0, "\\[0, 1\\)"),
                                   (100, -1, ">= 0"), (100, True, "int")):
        with pytest.raises(ValueError, match=message):
            dense_warmup_steps(total, warmup)


# -- FLOPs -------------------------------------------------------------------------------------------


def test_mlp_flops_match_measured_flops_of_the_sliced_projections() -> None:
    block = _gated_block()
    down = torch.randn(HIDDEN, INTER)
    context, output, kept = 12, 5, 10
    idx = torch.arange(kept)
    x_context = torch.randn(context, HIDDEN, requires_grad=True)
    x_output = torch.randn(output, HIDDEN, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        sparse = (F.silu(x_context @ block.gate[idx].T) * (x_context @ block.up[idx].T)) @ down[:, idx].T
        dense = (F.silu(x_output @ block.gate.T) * (x_output @ block.up.T)) @ down.T
        (sparse.sum() + dense.sum()).backward()
    flops = mlp_flops(HIDDEN, INTER, context_tokens=context, output_tokens=output, kept=kept)
    assert counter.get_total_flops() == flops.sparse
    assert flops.dense == 2 * 2 * 3 * (context + output) * HIDDEN * INTER
    assert flops.skipped == 2 * 2 * 3 * context * HIDDEN * (INTER - kept)
    assert mlp_flops(HIDDEN, INTER, context_tokens=context, output_tokens=output, kept=INTER).skipped == 0
    assert mlp_flops(HIDDEN, INTER, context_tokens=4, output_tokens=0, kept=8, gated=False).sparse_forward == (
        2 * 2 * 4 * HIDDEN * 8
    )
    with pytest.raises(ValueError, match="exceeds"):
        mlp_flops(HIDDEN, INTER, context_tokens=1, output_tokens=1, kept=INTER + 1)


def test_attention_projection_flops() -> None:
    kv = N_KV * HEAD_DIM
    full = attention_projection_flops(HIDDEN, N_HEADS, N_KV, HEAD_DIM, context_tokens=7, output_tokens=3,
                                      kept_qk=kv, kept_v=kv)
    assert full.skipped == 0 and full.dense_forward == 2 * 10 * HIDDEN * (2 * N_HEADS * HEAD_DIM + 2 * kv)
    sparse = attention_projection_flops(HIDDEN, N_HEADS, N_KV, HEAD_DIM, context_tokens=7, output_tokens=3,
                                        kept_qk=3, kept_v=5)
    idx = attention_indices(torch.arange(3), torch.arange(5), N_HEADS, N_KV, HEAD_DIM)
    rows = sum(t.numel() for t in idx)  # q + k + v rows and o columns
    assert sparse.sparse_forward == 2 * HIDDEN * (7 * rows + 3 * (2 * N_HEADS * HEAD_DIM + 2 * kv))
    assert sparse.sparse_backward == sparse.sparse_forward
    total = sparse + full
    assert total.dense == sparse.dense + full.dense and math.isclose(total.skipped, sparse.skipped)
    with pytest.raises(ValueError, match="exceeds"):
        attention_projection_flops(HIDDEN, N_HEADS, N_KV, HEAD_DIM, context_tokens=1, output_tokens=1,
                                   kept_qk=kv + 1, kept_v=1)
