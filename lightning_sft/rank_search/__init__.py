"""Adaptive LoRA rank search: the scoring rule, the successive-halving schedule, parameter counts and the
per-module rank allocation (``search``), and what a trial changes in the module and how it is put back
(``trial_state``). Pure torch; the ``AdaptiveRankSearch`` callback runs the trials."""

from lightning_sft.rank_search.search import (
    DEFAULT_CANDIDATES,
    GROWTH,
    Trial,
    adapter_params,
    allocate_ranks,
    best,
    component_importance,
    config_at_ranks,
    fitted_trial_steps,
    format_table,
    halving_schedule,
    score,
    search_steps,
    validate_candidates,
    validate_penalty,
)

__all__ = [
    "DEFAULT_CANDIDATES",
    "GROWTH",
    "Trial",
    "adapter_params",
    "allocate_ranks",
    "best",
    "component_importance",
    "config_at_ranks",
    "fitted_trial_steps",
    "format_table",
    "halving_schedule",
    "score",
    "search_steps",
    "validate_candidates",
    "validate_penalty",
]
