"""Contextual sparsity over a whole model: install a ``SparseBlock`` on each described block (every
check and estimator before the first change), find the installed ones, and remove them all.
Pure torch (no Lightning).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from lightning_sft.anatomy import BlockAnatomy, projection_base
from lightning_sft.sharding import unsharded
from lightning_sft.sparsity.estimators import build_estimator
from lightning_sft.sparsity.schedule import kept_channels
from lightning_sft.sparsity.sparse_blocks import OWNER, SparseBlock
from lightning_sft.sparsity.state import SparsityState


def sparse_blocks(model: nn.Module) -> list[SparseBlock]:
    """The ``SparseBlock``s installed on ``model``'s modules, in module order, once each."""
    blocks: dict[int, SparseBlock] = {}
    for module in model.modules():
        block = module.__dict__.get(OWNER)
        if block is not None:
            blocks.setdefault(id(block), block)
    return list(blocks.values())


def kept_counts(anatomy: BlockAnatomy, sparsity: float) -> dict[str, int]:
    """Channels kept per group: attention Q/K balanced over kv heads with RoPE pairs together."""
    if anatomy.kind == "mlp":
        return {"mlp": kept_channels(anatomy.intermediate, sparsity)}
    num_kv_heads = anatomy.heads[1]
    kv = anatomy.groups[0].channels
    return {"qk": kept_channels(kv, sparsity, multiple_of=2 * num_kv_heads), "v": kept_channels(kv, sparsity)}


def sparsify(
    model: nn.Module,
    blocks: Sequence[BlockAnatomy],
    sparsity_per_block: Sequence[float],
    state: SparsityState,
    strategy: str,
    **estimator_options: object,
) -> list[SparseBlock]:
    """Make each described block of ``model`` sparse at its sparsity (0 leaves it dense and untouched).

    Every check and every estimator comes before the first change, so bad input leaves ``model``
    unchanged. Returns the installed blocks.
    """
    if len(sparsity_per_block) != len(blocks):
        raise ValueError(f"{len(sparsity_per_block)} sparsities for {len(blocks)} blocks; pass one per block.")
    taken = {id(m) for b in sparse_blocks(model) for m in (*b.modules.values(), b.region) if m is not None}
    planned: list[SparseBlock] = []
    for anatomy, sparsity in zip(blocks, sparsity_per_block):
        keep = kept_counts(anatomy, sparsity)
        if sparsity == 0:
            continue
        for path in anatomy.projections:
            module = model.get_submodule(path)
            if id(module) in taken:
                raise ValueError(f"{path} is already sparse (or passed twice); desparsify(model) first.")
            taken.add(id(module))
            projection_base(module, path)
        # Estimators copy what they need of the weights, so a sharded block lends them whole only here.
        with unsharded([model.get_submodule(path) for path in anatomy.projections]):
            estimators = {
                name: build_estimator(strategy, block, anatomy.key(name), **estimator_options)
                for name, block in anatomy.estimator_blocks(model).items()
            }
        planned.append(SparseBlock(model, anatomy, state, estimators, keep))
    for block in planned:
        block.install()
    return planned


def desparsify(model: nn.Module) -> list[str]:
    """Remove every sparse block from ``model`` (its modules' own forwards back); returns their names."""
    blocks = sparse_blocks(model)
    for block in blocks:
        block.remove()
    return [block.name for block in blocks]
