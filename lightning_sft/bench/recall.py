"""Channel-selection recall of the contextual-sparsity estimators on the shipped pretrained base.

For every decoder layer of ``sft-llama-5m`` and real batches of the embedded arithmetic task's
validation split, the hidden states entering the MLP and the attention (forward pre-hooks on
``mlp`` and ``self_attn``) are captured, and each estimator's top-k channels are compared with the
oracle's (exact projections, same scoring and same structured top-k) via ``recall``. ``svd<r>`` are
the reference's weight-only factors; ``svd<r>-cal`` the calibrated (activation-whitened) factors
that ``ContextualSparsity`` uses by default, fitted on the context tokens of batches from the
task's *training* split (disjoint from the validation batches scored), as its warm-up would. The blocks and
kept counts are those ``ContextualSparsity`` builds: ``BlockAnatomy.estimator_blocks`` of each block
``lightning_sft.anatomy.describe`` finds and ``sparsity.kept_counts``. The context mask is ``context_mask_from_labels``
restricted to real (non-padding) tokens.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from lightning_sft.bench.common import run_and_report
from lightning_sft.validation import int_at_least
from lightning_sft.sparsity.context import context_mask_from_labels
from lightning_sft.anatomy import describe
from lightning_sft.sparsity import build_estimator, kept_counts, recall
from lightning_sft.sparsity.calibration import InputStatistics

NAME = "recall"
HELP = "recall of the estimators' channel choices against the oracle's, per layer, on the shipped pretrained base"
MODEL = "sft-llama-5m"
PARTS = ("mlp", "qk", "v")
TARGET_RANK, TARGET_RECALL = 8, 0.85
TARGET = f"svd{TARGET_RANK}-cal"  # what ContextualSparsity(strategy="svd") uses by default


def _sparsity(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1); got {value}")
    return value


def _ranks(text: str) -> list[int]:
    try:
        ranks = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers; got {text!r}") from error
    if not ranks or min(ranks) < 1:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers >= 1; got {text!r}")
    return sorted(set(ranks))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sparsity", type=_sparsity, default=0.5, help="fraction of channels skipped (default 0.5)")
    parser.add_argument("--ranks", type=_ranks, default=[8, 16, 32], help="SVD ranks, comma-separated (default 8,16,32)")
    parser.add_argument("--batches", type=int_at_least(1), default=8, help="validation batches averaged (default 8)")
    parser.add_argument("--batch-size", type=int_at_least(1), default=16, help="samples per batch (default 16)")
    parser.add_argument("--calibration-batches", type=int_at_least(1), default=8,
                        help="training-split batches the calibrated estimators are fitted on (default 8)")
    parser.add_argument("--seed", type=int_at_least(0), default=0, help="task generation seed (default 0)")
    parser.add_argument("--threads", type=int_at_least(1), default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON to PATH")


def run(args: argparse.Namespace) -> int:
    """Entry point of ``lightning-sft bench recall``."""
    return run_and_report(
        args.threads, args.json,
        lambda: benchmark(args.sparsity, args.ranks, args.batches, args.batch_size, args.seed, args.calibration_batches),
        format_report,
    )


def _batches(
    tokenizer: Any, batches: int, calibration_batches: int, batch_size: int, seed: int
) -> dict[str, list[dict[str, torch.Tensor]]]:
    """Collated ``train`` (calibration) and ``val`` (scored) batches, from one disjoint draw."""
    from lightning_sft.data.prompt_response import collate, encode
    from lightning_sft.tasks import generate_splits

    splits = generate_splits(calibration_batches * batch_size, batches * batch_size, 0, seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collated = {}
    for split in ("train", "val"):
        encoded = [encode(example, tokenizer, max_length=64) for example in splits[split]]
        collated[split] = [collate(encoded[i : i + batch_size], pad_id) for i in range(0, len(encoded), batch_size)]
    return collated


def _capture(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Per layer: the hidden states entering ``mlp`` and ``self_attn`` (after their RMSNorms)."""
    layers = model.model.layers
    captured: list[dict[str, torch.Tensor]] = [{} for _ in layers]

    def hook(store: dict[str, torch.Tensor], key: str) -> Any:
        def pre_hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            store[key] = args[0] if args else kwargs["hidden_states"]

        return pre_hook

    handles = []
    for layer, store in zip(layers, captured):
        handles.append(layer.mlp.register_forward_pre_hook(hook(store, "mlp"), with_kwargs=True))
        handles.append(layer.self_attn.register_forward_pre_hook(hook(store, "attn"), with_kwargs=True))
    try:
        with torch.no_grad():
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        for handle in handles:
            handle.remove()
    return captured


def benchmark(
    sparsity: float, ranks: list[int], batches: int, batch_size: int, seed: int = 0, calibration_batches: int = 8
) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lightning_sft.assets import SHIPPED_MODELS

    start = time.perf_counter()
    path = SHIPPED_MODELS[MODEL]
    model = AutoModelForCausalLM.from_pretrained(path).to(torch.float32).eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(path)
    strategies = [f"svd{rank}" for rank in ranks] + [f"svd{rank}-cal" for rank in ranks] + ["norm", "random"]
    data = _batches(tokenizer, batches, calibration_batches, batch_size, seed)

    # Calibration statistics of each layer's MLP and attention inputs on the training batches.
    statistics = [{"mlp": InputStatistics(), "attn": InputStatistics()} for _ in model.model.layers]
    for batch in data["train"]:
        mask = context_mask_from_labels(batch["labels"]) & batch["attention_mask"].bool()
        for inputs, stats in zip(_capture(model, batch), statistics):
            for where in ("mlp", "attn"):
                stats[where].update(inputs[where], mask)

    # One estimator per (layer, part, strategy), prepared once (SVDs) and reused on every batch.
    layers: list[dict[str, Any]] = []
    anatomy = describe(model)
    for i, (mlp, attn) in enumerate(zip(anatomy.mlps, anatomy.attentions)):
        blocks = {**mlp.estimator_blocks(model), **attn.estimator_blocks(model)}
        keep = {**kept_counts(mlp, sparsity), **kept_counts(attn, sparsity)}
        estimators = {
            part: {
                "oracle": build_estimator("oracle", block),
                **{f"svd{rank}": build_estimator("svd", block, rank=rank) for rank in ranks},
                **{f"svd{rank}-cal": build_estimator("svd", block, rank=rank, calibrated=True) for rank in ranks},
                "norm": build_estimator("norm", block),
                "random": build_estimator("random", block),
            }
            for part, block in blocks.items()
        }
        for part, by_strategy in estimators.items():
            stats = statistics[i]["mlp" if part == "mlp" else "attn"]
            for rank in ranks:
                by_strategy[f"svd{rank}-cal"].calibrate(stats.gram, stats.tokens)
        layers.append({"keep": keep, "estimators": estimators})

    sums = [{part: dict.fromkeys(strategies, 0.0) for part in PARTS} for _ in layers]
    context_tokens = total_tokens = 0
    for batch in data["val"]:
        mask = context_mask_from_labels(batch["labels"]) & batch["attention_mask"].bool()
        context_tokens += int(mask.sum())
        total_tokens += int(batch["attention_mask"].sum())
        hidden = _capture(model, batch)
        for layer, inputs, sums_layer in zip(layers, hidden, sums):
            for part in PARTS:
                x = inputs["mlp" if part == "mlp" else "attn"]
                k, estimators = layer["keep"][part], layer["estimators"][part]
                oracle = estimators["oracle"].select(x, k, mask)
                for strategy in strategies:
                    sums_layer[part][strategy] += recall(estimators[strategy].select(x, k, mask), oracle)
    per_layer = [{part: {s: v / len(data["val"]) for s, v in parts[part].items()} for part in PARTS} for parts in sums]
    mean = {part: {s: sum(row[part][s] for row in per_layer) / len(per_layer) for s in strategies} for part in PARTS}
    result: dict[str, Any] = {
        "model": MODEL,
        "sparsity": sparsity,
        "ranks": ranks,
        "batches": len(data["val"]),
        "calibration_batches": len(data["train"]),
        "calibration_tokens": statistics[0]["mlp"].tokens,
        "batch_size": batch_size,
        "context_tokens": context_tokens,
        "tokens": total_tokens,
        "kept": layers[0]["keep"],
        "channels": {group.name: group.channels for block in anatomy.mlps[:1] + anatomy.attentions[:1] for group in block.groups},
        "strategies": strategies,
        "per_layer": per_layer,
        "mean": mean,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    if TARGET_RANK in ranks:
        values = [row["mlp"][TARGET] for row in per_layer]
        worst = min(range(len(values)), key=values.__getitem__)
        result["target"] = {"min": values[worst], "layer": worst, "pass": values[worst] >= TARGET_RECALL}
    result["seconds"] = time.perf_counter() - start
    return result


def format_report(result: dict[str, Any]) -> str:
    strategies = result["strategies"]
    kept, channels = result["kept"], result["channels"]
    lines = [
        f"Estimator recall vs oracle top-k, {result['model']} (pretrained, fp32), sparsity {result['sparsity']}: "
        + ", ".join(f"{part.upper()} keeps {kept[part]}/{channels[part]}" for part in PARTS),
        f"{result['batches']} validation batches x {result['batch_size']} of the embedded arithmetic task; "
        f"{result['context_tokens']} of {result['tokens']} tokens are context (context_mask_from_labels, padding excluded)",
        f"svd<r>: weight-only factors (the reference); svd<r>-cal: calibrated on {result['calibration_tokens']} context"
        f" tokens of {result['calibration_batches']} training-split batches (the ContextualSparsity default)",
        "Q/K: QKBlock(balanced=True, rotary_pairs=True); recall averaged over batches; "
        f"torch {result['torch']}, {result['threads']} threads, {result['seconds']:.1f} s",
        "",
    ]
    titles = {"mlp": "MLP (gated)", "qk": "Q/K", "v": "V"}
    rows = [(str(i), row) for i, row in enumerate(result["per_layer"])] + [("mean", result["mean"])]
    for part in PARTS:
        lines.append(f"{titles[part]:<12}" + "".join(f"{s:>10}" for s in strategies))
        for label, row in rows:
            name = "mean" if label == "mean" else f"layer {label}"
            lines.append(f"{name:<12}" + "".join(f"{row[part][s]:>10.3f}" for s in strategies))
        lines.append("")
    target = result.get("target")
    if target is None:
        lines.append(f"target: svd rank {TARGET_RANK} not measured (add {TARGET_RANK} to --ranks)")
    else:
        verdict = "PASS" if target["pass"] else "FAIL"
        lines.append(
            f"{TARGET} MLP recall >= {TARGET_RECALL} on every layer: {verdict} "
            f"(min {target['min']:.3f} at layer {target['layer']})"
        )
    return "\n".join(lines)
