"""Count defaults use what the data offers (within limit_train_batches / limit_val_batches), saying so once;
an explicit count the data cannot meet stays an error."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
from lightning.pytorch.callbacks import Callback

import sharded_cases as cases
from lightning_sft import AdaptiveRankSearch, LayerDropout, LoRA, SparseFineTuning


def _fit(callbacks: list[Callback], train_batches: int = 3, val_batches: int = 2, **options: object) -> pl.Trainer:
    """A plain module on a 3-batch training loader and a 2-batch validation loader (4 sequences a batch)."""
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, callbacks=callbacks, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, **options)
    trainer.fit(cases.UserModule(), cases.loader(4 * train_batches), cases.loader(4 * val_batches))
    return trainer


def test_rank_search_defaults_fit_a_small_loader(recwarn: pytest.WarningsRecorder) -> None:
    search = AdaptiveRankSearch(candidates=(2, 4, 8))
    trainer = _fit([LoRA(r=2), search])
    assert trainer.global_step == 2 and search.record is not None
    # 3 training batches: the longest (second) round trains 3 x trial_steps steps, so trial_steps = 1.
    assert search.record["val_batches_per_trial"] == 2 and search.trial_steps == 1
    messages = [str(w.message) for w in recwarn]
    assert any("using trial_steps=1" in m for m in messages) and any("using val_batches=2" in m for m in messages)


def test_limit_val_batches_is_honoured_by_the_defaults() -> None:
    search = AdaptiveRankSearch(candidates=(2, 4), rounds=1)
    _fit([LoRA(r=2), search], train_batches=4, val_batches=6, limit_val_batches=2)
    assert search.record["val_batches_per_trial"] == 2


def test_layer_dropout_auto_probes_what_there_is() -> None:
    dropout = LayerDropout(rate="auto", protect_first=0, protect_last=0, decide_every=1)
    with pytest.warns(UserWarning, match="using probe_batches=2"):
        trainer = _fit([LoRA(r=2), dropout])
    assert trainer.global_step == 2 and len(dropout._probe) == 2


def test_sparse_finetuning_scores_on_what_there_is() -> None:
    sft = SparseFineTuning(density=0.05)
    with pytest.warns(UserWarning, match="using score_batches=3"):
        trainer = _fit([sft])
    assert trainer.global_step == 2 and sft._selected


@pytest.mark.parametrize(
    ("callbacks", "match"),
    [
        (lambda: [LoRA(r=2), AdaptiveRankSearch(candidates=(2, 4), trial_steps=1, val_batches=3)],
         r"needs 3 validation batches \(val_batches=3\), but the validation data has 2"),
        (lambda: [LoRA(r=2), AdaptiveRankSearch(candidates=(2, 4), trial_steps=1, val_batches=2)],
         r"has 1 \(within limit_val_batches=1\)"),
        (lambda: [LayerDropout(rate="auto", probe_batches=3, protect_first=0, protect_last=0)],
         r"`probe_batches=3` needs 3 validation batches, but the validation data gives 2"),
        (lambda: [SparseFineTuning(score_batches=4)], r"`score_batches=4` needs 4 training batches, but the training data gives 3"),
    ],
    ids=["rank-search-val", "rank-search-limit", "probe", "score"],
)
def test_an_explicit_count_the_data_cannot_meet_is_an_error(callbacks: object, match: str) -> None:
    limit = {"limit_val_batches": 1} if "limit_val" in match else {}
    with pytest.raises(ValueError, match=match):
        _fit(callbacks(), **limit)
