"""The server side: FedAvg over the shared adapter tensors, with personal layers and per-layer weights.

``PersonalizedFedAvg`` is Flower's ``FedAvg`` with three changes:

* it sends and averages only the shared tensors (the personal ones never reach it; under
  ``personal="auto"`` it picks them after the probe round and stops sending them);
* it weighs each tensor separately (``weighting``), so a block a client mostly skipped under layer
  dropout counts less in that block's average;
* it checks every reply (the tensors sent, their shapes, finite values) and drops the ones that
  fail, as it drops error replies: a client that crashes or sends garbage mid-round cannot corrupt
  the global adapters; if no reply survives, the global adapters stay as they were.

It also keeps a per-round record (bytes each way, wall-clock, each client's metrics) for reports.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from logging import WARNING
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from lightning_sft.federated.aggregation import check_weighting, problem_with, tensor_weights, weighted_average
from lightning_sft.federated.client import RUN_FRACTION
from lightning_sft.federated.sharing import DEFAULT_AGREEMENT, PersonalLayers, choose_personal


@dataclass
class RoundRecord:
    """What one round cost and produced."""

    round: int
    bytes_down: int = 0  # adapter bytes sent to the clients for training
    bytes_up: int = 0  # adapter bytes the clients sent back
    eval_bytes_down: int = 0  # adapter bytes sent for evaluation
    train_seconds: float = 0.0  # wall-clock from sending the round to aggregating it
    failures: list[str] = field(default_factory=list)
    train: dict[int, dict[str, float]] = field(default_factory=dict)  # client -> its training metrics
    evaluate: dict[int, dict[str, float]] = field(default_factory=dict)  # client -> its test metrics
    agreement: dict[str, float] = field(default_factory=dict)  # group -> excess agreement (auto's probe round)
    sent: set[str] = field(default_factory=set)  # every tensor name sent to the clients for training
    received: set[str] = field(default_factory=set)  # every tensor name the clients sent back

    def mean(self, key: str, phase: str = "evaluate") -> float | None:
        """The clients' mean ``key`` in this round's ``train`` or ``evaluate`` metrics (None if none has it)."""
        values = [metrics[key] for metrics in getattr(self, phase).values() if key in metrics]
        return sum(values) / len(values) if values else None


def _bytes(messages: Iterable[Message]) -> int:
    return sum(
        record.count_bytes()
        for message in messages
        if message.has_content()
        for record in message.content.array_records.values()
    )


class PersonalizedFedAvg(FedAvg):
    """FedAvg of shared adapter tensors; see the module docstring.

    Args:
        groups: each adapter tensor's group (block), from ``adapter_groups``.
        personal: the personal-layer rule (``PersonalLayers``); ``auto`` decides after round 1.
        weighting: ``examples`` (FedAvg), ``uniform`` or ``layer`` (examples x the block's run fraction).
        agreement_threshold: under ``auto``, groups whose update agreement is below it go personal.
        **fedavg: ``FedAvg`` arguments (fractions, minimum nodes).
    """

    def __init__(
        self,
        groups: Mapping[str, str],
        personal: PersonalLayers,
        weighting: str = "layer",
        agreement_threshold: float = DEFAULT_AGREEMENT,
        **fedavg: Any,
    ) -> None:
        super().__init__(**fedavg)
        if not 0.0 < agreement_threshold < 1.0:
            raise ValueError(f"`agreement_threshold` must be in (0, 1); got {agreement_threshold!r}.")
        self.groups = dict(groups)
        self.personal = personal
        self.weighting = check_weighting(weighting)
        self.agreement_threshold = agreement_threshold
        self.rounds: list[RoundRecord] = []
        self.personal_names: set[str] = set()
        self.decided = False  # under auto: the split was chosen (after the first round two clients finished)
        self._sent: dict[str, torch.Tensor] = {}
        self._started = 0.0

    def _record(self, server_round: int) -> RoundRecord:
        if not self.rounds or self.rounds[-1].round != server_round:
            self.rounds.append(RoundRecord(server_round))
        return self.rounds[-1]

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(super().configure_train(server_round, arrays, config, grid))
        record = self._record(server_round)
        record.bytes_down = _bytes(messages)
        record.sent = set(arrays.keys())
        self._sent = dict(arrays.to_torch_state_dict())
        self._started = time.perf_counter()
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        record = self._record(server_round)
        record.bytes_up = _bytes(replies)
        updates, weights, metrics = [], [], []
        for reply in replies:
            source = reply.metadata.src_node_id
            if reply.has_error():
                record.failures.append(f"node {source}: {reply.error.reason}")
                continue
            if "arrays" in reply.content.array_records:
                record.received.update(reply.content.array_records["arrays"].keys())
            try:
                update, values = self._read(reply)
            except ValueError as problem:
                record.failures.append(f"node {source}: {problem}")
                continue
            fractions = {key[len(RUN_FRACTION):]: float(v) for key, v in values.items() if key.startswith(RUN_FRACTION)}
            updates.append(update)
            weights.append(tensor_weights(list(update), self.groups, self.weighting, float(values["num-examples"]), fractions))
            metrics.append(values)
            record.train[int(values.get("client", source))] = {k: float(v) for k, v in values.items()}
        for failure in record.failures:
            log(WARNING, "Round %s: dropped a reply from %s", server_round, failure)
        record.train_seconds = time.perf_counter() - self._started
        if not updates:
            return None, None  # the global adapters stay as they were
        averaged = weighted_average(self._sent, updates, weights)
        if self.personal.automatic and not self.decided and len(updates) > 1:
            self.decided = True
            deltas = [{n: u[n] - self._sent[n] for n in self._sent} for u in updates]
            examples = [float(m["num-examples"]) for m in metrics]
            chosen, record.agreement = choose_personal(
                {n: self.groups[n] for n in self._sent}, deltas, examples, self.agreement_threshold
            )
            self.personal_names = chosen
            averaged = {n: t for n, t in averaged.items() if n not in chosen}
        mean = {
            key: sum(float(m[key]) for m in metrics) / len(metrics)
            for key in ("train-loss", "train-seconds")
            if all(key in m for m in metrics)
        }
        return ArrayRecord(averaged), MetricRecord({**mean, "clients": len(updates)})

    def _read(self, reply: Message) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """A reply's update and metrics; a ValueError saying why it cannot be averaged."""
        content = reply.content
        if "arrays" not in content.array_records or "metrics" not in content.metric_records:
            raise ValueError("the reply lacks its 'arrays' or 'metrics' record")
        values = dict(content.metric_records["metrics"])
        if "num-examples" not in values:
            raise ValueError("its metrics lack 'num-examples'")
        if float(values["num-examples"]) < 0:
            raise ValueError("it reports a negative 'num-examples'")
        try:
            update = dict(content.array_records["arrays"].to_torch_state_dict())
        except Exception as error:  # a malformed array cannot be read back: refuse the reply, keep going
            raise ValueError(f"its arrays cannot be read ({error})") from None
        problem = problem_with(update, self._sent)
        if problem is not None:
            raise ValueError(problem)
        return update, values

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        self._record(server_round).eval_bytes_down = _bytes(messages)
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        record = self._record(server_round)
        results = []
        for reply in replies:
            if reply.has_error() or "metrics" not in reply.content.metric_records:
                record.failures.append(f"evaluation on node {reply.metadata.src_node_id} failed")
                continue
            values = {k: float(v) for k, v in reply.content.metric_records["metrics"].items()}
            record.evaluate[int(values.get("client", reply.metadata.src_node_id))] = values
            results.append(values)
        if not results:
            return None
        total = sum(r["num-examples"] for r in results)
        keys = set.intersection(*(set(r) for r in results)) - {"num-examples", "client"}
        return MetricRecord({k: sum(r[k] * r["num-examples"] for r in results) / total for k in sorted(keys)})
