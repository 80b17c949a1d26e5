"""Fine-tuning tasks: generated prompt/response data and how it is scored."""

from lightning_sft.tasks.arithmetic import Example, generate_splits, read_jsonl, write_jsonl
from lightning_sft.tasks.exact_match import ResponseExactMatch

__all__ = ["Example", "ResponseExactMatch", "generate_splits", "read_jsonl", "write_jsonl"]
