"""Ready-made LightningDataModules for the CLI."""

from lightning_sft.data.prompt_response import PromptResponseData
from lightning_sft.data.random_tokens import RandomTokenData

__all__ = ["PromptResponseData", "RandomTokenData"]
