"""Memory planning: what a fine-tuning step holds on each device, and which recipe fits a budget.

Pure arithmetic, no Lightning: ``estimate`` (the memory model), ``plan`` (the recipe planner),
``model_shape`` / ``PRESETS`` (model shapes from transformers configs). The measurement harness
that checks the model lives in ``lightning_sft.bench.memory_harness``. See docs/memory.md.
"""

from lightning_sft.memory.estimate import COMPONENTS, MemoryEstimate, estimate
from lightning_sft.memory.setup import TrainingSetup
from lightning_sft.memory.planner import NothingFits, Plan, Recipe, plan
from lightning_sft.memory.shapes import PRESETS, ModelShape, hf_config, model_shape

__all__ = [
    "COMPONENTS",
    "MemoryEstimate",
    "ModelShape",
    "NothingFits",
    "PRESETS",
    "Plan",
    "Recipe",
    "TrainingSetup",
    "estimate",
    "hf_config",
    "model_shape",
    "plan",
]
