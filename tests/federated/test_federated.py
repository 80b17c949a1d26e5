"""Federated fine-tuning: aggregation math, personal-layer rules, the server's reply checks, partitions,
and the Flower simulation end to end (Ray), including a client that fails mid-round."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from lightning_sft import LoRA
from lightning_sft.adapters.injection import LoRAConfig, inject_lora
from lightning_sft.federated import PersonalLayers, PersonalizedFedAvg, agreement, choose_personal, run_federated, weighted_average
from lightning_sft.federated.aggregation import problem_with, tensor_weights
from lightning_sft.federated.arithmetic import arithmetic_task, write_partitions
from lightning_sft.federated.client import FederatedTask
from lightning_sft.federated.partition import dirichlet_shares, split_by_shares
from lightning_sft.federated.sharing import adapter_groups, adapter_tensors, block_positions, excess_agreement
from lightning_sft.modules import CausalLM

# --- aggregation ---------------------------------------------------------------------------------------


def test_weighted_average_is_the_per_tensor_weighted_mean() -> None:
    previous = {"a": torch.zeros(2), "b": torch.zeros(3)}
    updates = [{"a": torch.tensor([1.0, 2.0]), "b": torch.ones(3)}, {"a": torch.tensor([3.0, 6.0]), "b": 4 * torch.ones(3)}]
    weights = [{"a": 1.0, "b": 3.0}, {"a": 3.0, "b": 1.0}]
    result = weighted_average(previous, updates, weights)
    torch.testing.assert_close(result["a"], torch.tensor([2.5, 5.0]))  # (1*1 + 3*3) / 4, (2 + 18) / 4
    torch.testing.assert_close(result["b"], torch.full((3,), 1.75))  # (3*1 + 1*4) / 4


def test_a_tensor_nobody_trained_keeps_its_value_and_dtypes_survive() -> None:
    previous = {"a": torch.tensor([5.0, 5.0], dtype=torch.bfloat16)}
    result = weighted_average(previous, [{"a": torch.zeros(2, dtype=torch.bfloat16)}], [{"a": 0.0}])
    assert result["a"].dtype == torch.bfloat16 and result["a"].tolist() == [5.0, 5.0]


def test_fedavg_weights_match_examples_and_layer_weights_scale_by_the_run_fraction() -> None:
    names, groups = ["x.A", "y.A", "head.A"], {"x.A": "blocks.0", "y.A": "blocks.1", "head.A": "head"}
    assert tensor_weights(names, groups, "uniform", 50, {}) == {"x.A": 1.0, "y.A": 1.0, "head.A": 1.0}
    assert tensor_weights(names, groups, "examples", 50, {"blocks.0": 0.5}) == {"x.A": 50.0, "y.A": 50.0, "head.A": 50.0}
    assert tensor_weights(names, groups, "layer", 50, {"blocks.0": 0.5, "blocks.1": 1.0}) == {
        "x.A": 25.0, "y.A": 50.0, "head.A": 50.0,
    }


@pytest.mark.parametrize(
    ("update", "match"),
    [
        ({"a": torch.zeros(2)}, "missing"),
        ({"a": torch.zeros(2), "b": torch.zeros(3), "secret": torch.zeros(1)}, "unexpected"),
        ({"a": torch.zeros(3), "b": torch.zeros(3)}, "shape"),
        ({"a": torch.tensor([0.0, float("nan")]), "b": torch.zeros(3)}, "non-finite"),
    ],
)
def test_bad_updates_are_named_and_never_averaged(update: dict, match: str) -> None:
    previous = {"a": torch.zeros(2), "b": torch.zeros(3)}
    assert match in problem_with(update, previous)
    with pytest.raises(ValueError, match=match):
        weighted_average(previous, [update], [{"a": 1.0, "b": 1.0, "secret": 1.0}])


# --- personal-layer rules ------------------------------------------------------------------------------


@pytest.fixture
def adapted() -> CausalLM:
    torch.manual_seed(0)
    module = CausalLM(model="tiny-llama")
    inject_lora(module, LoRAConfig(r=2), torch.Generator().manual_seed(0))
    return module


def test_groups_are_blocks_and_rules_pick_their_tensors(adapted: CausalLM) -> None:
    tensors = adapter_tensors(adapted)
    groups = adapter_groups(adapted, list(tensors))
    assert set(groups.values()) == {"model.model.layers.0", "model.model.layers.1"}
    positions = block_positions(adapted)
    last = PersonalLayers.parse("last:1").personal_names(groups, positions)
    assert last and all(".layers.1." in name for name in last)
    assert all(".layers.0." in name for name in PersonalLayers.parse("first:1").personal_names(groups, positions))
    b_only = PersonalLayers.parse(["lora_B"]).personal_names(groups, positions)
    assert b_only == {name for name in tensors if name.endswith("lora_B")}
    assert PersonalLayers.parse("none").personal_names(groups, positions) == set()
    assert PersonalLayers.parse("auto").personal_names(groups, positions) == set()


@pytest.mark.parametrize(
    ("spec", "match"),
    [("sometimes", "must be"), ([], "must be"), (["("], "regular expression"), (3, "must be")],
)
def test_bad_personal_rules_are_refused_with_the_forms(spec: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PersonalLayers.parse(spec)


def test_rules_that_pick_nothing_or_everything_are_refused(adapted: CausalLM) -> None:
    tensors = adapter_tensors(adapted)
    groups, positions = adapter_groups(adapted, list(tensors)), block_positions(adapted)
    with pytest.raises(ValueError, match="matches no adapter"):
        PersonalLayers.parse(["no_such_layer"]).personal_names(groups, positions)
    with pytest.raises(ValueError, match="nothing to share"):
        PersonalLayers.parse("last:2").personal_names(groups, positions)


def test_agreement_is_one_for_identical_updates_chance_for_unrelated_zero_for_opposite() -> None:
    e = torch.eye(4)
    assert agreement([e[0], e[0], e[0]], [1, 1, 1]) == pytest.approx(1.0)
    assert agreement([e[0], e[1], e[2], e[3]], [1, 1, 1, 1]) == pytest.approx(0.25)
    assert agreement([e[0], -e[0]], [1, 1]) == pytest.approx(0.0)
    assert excess_agreement([e[0], e[1], e[2], e[3]], [1, 1, 1, 1]) == pytest.approx(0.0)
    assert excess_agreement([e[0], e[1]], [3, 1]) == pytest.approx(0.0)  # chance is 0.75^2 + 0.25^2
    assert excess_agreement([e[0], e[0]], [3, 1]) == pytest.approx(1.0)


def test_choose_personal_keeps_disagreeing_groups_and_always_shares_one() -> None:
    groups = {"p.A": "g0", "q.A": "g1"}
    same, other = torch.ones(3), torch.tensor([1.0, -1.0, 0.0])
    deltas = [{"p.A": same, "q.A": same}, {"p.A": same, "q.A": other}]
    personal, scores = choose_personal(groups, deltas, [1, 1], threshold=0.5)
    assert personal == {"q.A"} and scores["g0"] == pytest.approx(1.0) and scores["g1"] < 0.5
    opposite = [{"p.A": same, "q.A": other}, {"p.A": -same, "q.A": -other}]
    personal, _ = choose_personal(groups, opposite, [1, 1], threshold=0.5)
    assert len(personal) == 1


# --- the server's strategy on hand-made replies ----------------------------------------------------------


class _Grid:
    def get_node_ids(self) -> list[int]:
        return [1, 2, 3]


@pytest.fixture
def flower_identity() -> Iterator[None]:
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def _reply(message: Message, arrays: dict[str, torch.Tensor], examples: float, **metrics: float) -> Message:
    content = RecordDict({"arrays": ArrayRecord(arrays), "metrics": MetricRecord({"num-examples": examples, **metrics})})
    return Message(content, reply_to=message)


GLOBAL = {"l.0.A": torch.zeros(2), "l.1.A": torch.zeros(2)}
GROUPS = {"l.0.A": "l.0", "l.1.A": "l.1"}


def test_failed_and_malformed_replies_are_dropped_and_the_rest_averaged(flower_identity: None) -> None:
    strategy = PersonalizedFedAvg(GROUPS, PersonalLayers.parse("none"), weighting="examples", min_available_nodes=3, min_train_nodes=3)
    sent = list(strategy.configure_train(1, ArrayRecord(GLOBAL), ConfigRecord(), _Grid()))
    replies = [
        _reply(sent[0], {"l.0.A": torch.ones(2), "l.1.A": torch.ones(2)}, 10),
        Message(Error(code=0, reason="client crashed at step 3"), reply_to=sent[1]),
        _reply(sent[2], {"l.0.A": torch.full((2,), float("nan")), "l.1.A": torch.ones(2)}, 1000),
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    result = arrays.to_torch_state_dict()
    assert result["l.0.A"].tolist() == [1.0, 1.0] and result["l.1.A"].tolist() == [1.0, 1.0]
    failures = strategy.rounds[0].failures
    assert len(failures) == 2 and "crashed" in failures[0] and "non-finite" in failures[1]


def test_a_round_where_every_client_fails_leaves_no_aggregate(flower_identity: None) -> None:
    strategy = PersonalizedFedAvg(GROUPS, PersonalLayers.parse("none"), min_available_nodes=3, min_train_nodes=3)
    sent = list(strategy.configure_train(1, ArrayRecord(GLOBAL), ConfigRecord(), _Grid()))
    replies = [Message(Error(code=0, reason="out of memory"), reply_to=m) for m in sent]
    assert strategy.aggregate_train(1, replies) == (None, None)  # Strategy.start then keeps the previous arrays


def test_layer_weighting_counts_a_mostly_skipped_block_less(flower_identity: None) -> None:
    strategy = PersonalizedFedAvg(GROUPS, PersonalLayers.parse("none"), weighting="layer", min_available_nodes=3, min_train_nodes=3)
    sent = list(strategy.configure_train(1, ArrayRecord(GLOBAL), ConfigRecord(), _Grid()))
    replies = [
        _reply(sent[0], {"l.0.A": torch.ones(2), "l.1.A": torch.ones(2)}, 10, **{"run-fraction/l.0": 1.0, "run-fraction/l.1": 0.25}),
        _reply(sent[1], {"l.0.A": 3 * torch.ones(2), "l.1.A": 3 * torch.ones(2)}, 10, **{"run-fraction/l.0": 1.0, "run-fraction/l.1": 1.0}),
        _reply(sent[2], {"l.0.A": 2 * torch.ones(2), "l.1.A": 2 * torch.ones(2)}, 0),
    ]
    result = strategy.aggregate_train(1, replies)[0].to_torch_state_dict()
    assert result["l.0.A"].tolist() == pytest.approx([2.0, 2.0])
    assert result["l.1.A"].tolist() == pytest.approx([(0.25 * 1 + 3) / 1.25] * 2)


def test_auto_makes_the_disagreeing_block_personal_once_and_stops_sending_it(flower_identity: None) -> None:
    strategy = PersonalizedFedAvg(GROUPS, PersonalLayers.parse("auto"), min_available_nodes=2, min_train_nodes=2)

    class TwoNodes(_Grid):
        def get_node_ids(self) -> list[int]:
            return [1, 2]

    sent = list(strategy.configure_train(1, ArrayRecord(GLOBAL), ConfigRecord(), TwoNodes()))
    replies = [
        _reply(sent[0], {"l.0.A": torch.tensor([1.0, 1.0]), "l.1.A": torch.tensor([1.0, 0.0])}, 5),
        _reply(sent[1], {"l.0.A": torch.tensor([1.0, 1.0]), "l.1.A": torch.tensor([0.0, 1.0])}, 5),
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert list(arrays.keys()) == ["l.0.A"] and strategy.personal_names == {"l.1.A"}
    assert strategy.rounds[0].agreement == pytest.approx({"l.0": 1.0, "l.1": 0.0})
    sent = list(strategy.configure_train(2, arrays, ConfigRecord(), TwoNodes()))
    assert all(list(m.content.array_records["arrays"].keys()) == ["l.0.A"] for m in sent)
    replies = [_reply(m, {"l.0.A": torch.zeros(2)}, 5) for m in sent]
    arrays, _ = strategy.aggregate_train(2, replies)
    assert strategy.personal_names == {"l.1.A"} and list(arrays.keys()) == ["l.0.A"]  # decided once


# --- partitions ------------------------------------------------------------------------------------------


def test_dirichlet_partition_covers_every_item_once_and_keeps_order() -> None:
    items = list(range(400))
    skills = ["abcd"[i % 4] for i in items]
    shares = dirichlet_shares("abcd", 3, 0.5, seed=0)
    assert all(sum(s) == pytest.approx(1.0) for s in shares.values())
    parts = split_by_shares(items, skills, shares)
    assert sorted(i for part in parts for i in part) == items
    assert all(part == sorted(part) for part in parts)
    assert split_by_shares(items, skills, dirichlet_shares("abcd", 3, 0.5, seed=0)) == parts
    skewed = [max(sum(skills[i] == k for i in part) for k in "abcd") / max(len(part), 1) for part in parts]
    assert max(skewed) > 0.4  # alpha 0.5 concentrates skills (IID would be 0.25)
    with pytest.raises(ValueError, match="alpha"):
        dirichlet_shares("abcd", 3, 0.0, seed=0)


# --- the simulation, end to end (Ray) -------------------------------------------------------------------


class _FailOnce(pl.Callback):
    """Raise at the second training step of the first round on one client (a device crashing mid-round)."""

    def __init__(self, marker: str) -> None:
        self.marker = Path(marker)

    def on_train_batch_start(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step == 1 and not self.marker.exists():
            self.marker.write_text("failed once")
            raise RuntimeError("simulated device failure")


def _callbacks(marker: str, client: int) -> list[pl.Callback]:
    return [LoRA(r=4, alpha=8)] + ([_FailOnce(marker)] if client == 1 else [])


@pytest.fixture(scope="module")
def partitions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("federation")
    write_partitions(root, 2, 1.0, num_train=128, num_val=32, num_test=32, seed=0)
    return root


def test_two_clients_one_round_end_to_end_personal_layers_stay_home(partitions: Path, tmp_path: Path) -> None:
    task = arithmetic_task(partitions, batch_size=8, lora_r=4, lora_alpha=8.0)
    result = run_federated(
        task, num_clients=2, rounds=1, local_steps=3, personal="last:1", layer_dropout="auto", budgets=(1.0, 0.7),
        decide_every=1, probe_batches=1, save_dir=str(tmp_path / "adapters"),
    )
    (record,) = result.rounds
    assert record.failures == [] and sorted(record.train) == [0, 1] and sorted(record.evaluate) == [0, 1]
    personal = set(result.personal)
    assert personal and all(".layers.5." in name for name in personal)
    assert record.sent == record.received == set(result.shared) and not personal & record.received
    raw = 2 * sum(t.numel() * t.element_size() for t in result.shared.values())
    assert raw < record.bytes_up < 1.05 * raw  # the tensors plus Flower's per-array names and headers
    assert record.train[1]["compute-budget"] == 0.7 and record.train[1]["drop-rate"] >= 0.5
    assert 0.0 <= record.evaluate[0]["test_acc"] <= 1.0
    # Each client's personalised adapter: the shared tensors equal the global ones, the personal ones differ.
    from safetensors.torch import load_file

    saved = [load_file(tmp_path / "adapters" / f"client-{c}" / "adapter_model.safetensors") for c in (0, 1)]
    personal_key = next(k for k in saved[0] if ".layers.5." in k and "lora_B" in k)
    assert not torch.equal(saved[0][personal_key], saved[1][personal_key])
    shared_key = next(k for k in saved[0] if ".layers.0." in k and "lora_B" in k)
    torch.testing.assert_close(saved[0][shared_key], saved[1][shared_key], rtol=0, atol=0)


def test_a_client_failing_mid_round_is_left_out_and_the_federation_goes_on(partitions: Path, tmp_path: Path) -> None:
    base = arithmetic_task(partitions, batch_size=8, lora_r=4, lora_alpha=8.0)
    task = FederatedTask(base.module, base.data, functools.partial(_callbacks, str(tmp_path / "failed")))
    result = run_federated(task, num_clients=2, rounds=2, local_steps=2, personal="none", layer_dropout=None, evaluate=False)
    first, second = result.rounds
    assert len(first.failures) == 1 and "simulated device failure" in first.failures[0]
    assert sorted(first.train) == [0] and sorted(second.train) == [0, 1] and second.failures == []
    assert all(bool(torch.isfinite(t).all()) for t in result.shared.values())


def test_bad_settings_fail_before_the_simulation_starts(partitions: Path) -> None:
    task = arithmetic_task(partitions, batch_size=8, lora_r=4, lora_alpha=8.0)
    with pytest.raises(ValueError, match="Client 1: No drop rate"):
        run_federated(task, 2, 1, 1, layer_dropout="auto", budgets=(1.0, 0.5))
    with pytest.raises(ValueError, match="at least 2 clients"):
        run_federated(task, 1, 1, 1, personal="auto")
    with pytest.raises(ValueError, match="LoRA callback"):
        run_federated(FederatedTask(task.module, task.data, lambda client: []), 2, 1, 1)


# --- the command line ---------------------------------------------------------------------------------


def test_cli_runs_a_small_federation_and_writes_its_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from lightning_sft.cli.federated import main

    code = main([
        "--clients", "2", "--rounds", "1", "--local-steps", "2", "--personal", "last:1", "--budgets", "1,0.7",
        "--num-train", "128", "--num-val", "32", "--num-test", "32", "--batch-size", "8", "--lora-r", "4",
        "--workdir", str(tmp_path),
    ])
    assert code == 0
    out = capsys.readouterr().out
    assert "personalised acc" in out and "personal tensors: 14 of 84" in out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["summary"]["personal_tensors"] == 14 and report["rounds"][0]["bytes_up"] > 0
    assert (tmp_path / "adapters" / "client-1" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--budgets", "1,0.5"], "Client 1: No drop rate"),
        (["--clients", "1"], "at least 2 clients"),
        (["--personal", "no_such_layer"], "matches no adapter"),
    ],
)
def test_cli_refuses_bad_settings_with_exit_2_before_simulating(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lightning_sft.cli.federated import main

    assert main([*argv, "--num-train", "64", "--num-val", "16", "--num-test", "16", "--workdir", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "report.json").exists()


@pytest.mark.parametrize(("tolerate", "code"), [([], 1), (["--tolerate-failures"], 0)])
def test_cli_exits_1_when_a_client_failed_in_the_last_round(
    tolerate: list[str], code: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from lightning_sft.cli import federated as command
    from lightning_sft.federated.server import RoundRecord
    from lightning_sft.federated.simulation import FederatedResult

    failed = RoundRecord(round=1, train_seconds=1.0, failures=["Client 1: ValueError: needs 2 validation batches\n  ..."])
    result = FederatedResult(rounds=[failed], shared={}, personal=[], total_tensors=4)
    monkeypatch.setattr(command, "simulate", lambda args, personal, dropout: (result, [{"add": 1}, {"sub": 1}]))
    assert command.main(["--workdir", str(tmp_path), *tolerate]) == code
    err = capsys.readouterr().err
    assert ("client(s) failed in the last round: Client 1: ValueError" in err) == (code == 1)
    assert (tmp_path / "report.json").is_file()  # the report is written either way
