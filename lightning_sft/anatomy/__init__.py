"""Finding things in a user's model by structure, not by class: the channel groups of its MLP and
attention blocks (which rows of which projections produce a channel, which columns consume it).

Pure torch (no Lightning). See ``docs/contextual_sparsity.md`` ("Adding a model family").
"""

from lightning_sft.anatomy.channels import (
    ATTENTION_LAYOUTS,
    MLP_LAYOUTS,
    AttentionLayout,
    BlockAnatomy,
    ChannelGroup,
    MLPLayout,
    ModelAnatomy,
    Part,
    Slice,
    describe,
    projection_base,
)

__all__ = [
    "ATTENTION_LAYOUTS",
    "MLP_LAYOUTS",
    "AttentionLayout",
    "BlockAnatomy",
    "ChannelGroup",
    "MLPLayout",
    "ModelAnatomy",
    "Part",
    "Slice",
    "describe",
    "projection_base",
]
