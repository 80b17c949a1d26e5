"""Run a federation on one machine with Flower's simulation engine (Ray backend).

``run_federated`` builds the ServerApp (``PersonalizedFedAvg`` started from the seeded initial
adapters) and the ClientApp (``make_client_app``), runs ``rounds`` rounds over ``num_clients``
simulated clients, and returns the per-round records and the final shared adapters.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from lightning_sft.federated.client import ClientSettings, FederatedTask, initial_adapters, make_client_app
from lightning_sft.federated.server import PersonalizedFedAvg, RoundRecord
from lightning_sft.federated.sharing import DEFAULT_AGREEMENT, PersonalLayers, block_positions
from lightning_sft.anatomy.stacks import find_stacks
from lightning_sft.validation import check_int


@dataclass
class FederatedResult:
    """What a federation produced: one record per round, the final shared adapters, the personal names."""

    rounds: list[RoundRecord]
    shared: dict[str, torch.Tensor]
    personal: list[str]
    total_tensors: int
    settings: dict[str, Any] = field(default_factory=dict)

    def final_accuracy(self, key: str = "test_acc") -> dict[int, float]:
        """Each client's ``key`` from the last evaluation that reported it."""
        for record in reversed(self.rounds):
            if record.evaluate and all(key in v for v in record.evaluate.values()):
                return {client: values[key] for client, values in sorted(record.evaluate.items())}
        return {}


def run_federated(
    task: FederatedTask,
    num_clients: int,
    rounds: int,
    local_steps: int,
    personal: str | list[str] | None = "auto",
    layer_dropout: float | str | None = "auto",
    budgets: tuple[float, ...] = (1.0,),
    weighting: str = "layer",
    agreement_threshold: float = DEFAULT_AGREEMENT,
    evaluate: bool = True,
    cpus_per_client: int = 1,
    seed: int = 0,
    decide_every: int = 10,
    probe_batches: int = 2,
    save_dir: str | None = None,
) -> FederatedResult:
    """Simulate ``rounds`` rounds of federated fine-tuning of ``task`` on ``num_clients`` clients.

    Args:
        personal: the personal-layer rule (``PersonalLayers.parse``): ``"none"``, ``"auto"``, ``"last:K"``,
            ``"first:K"`` or a list of regular expressions over adapter names.
        layer_dropout: ``None`` (off), a fixed rate, or ``"auto"`` (a bandit per client).
        budgets: per-client compute budgets, cycled over the clients (1.0: a full device).
        weighting: ``"layer"``, ``"examples"`` or ``"uniform"`` (see ``aggregation``).
        evaluate: evaluate every client's personalised model on its test split after each round.
        cpus_per_client: CPU cores each simulated client holds (clients run in parallel on the rest).
        save_dir: if set (with ``evaluate``), each client writes its personalised adapter (peft format) to
            ``save_dir/client-<i>`` at every evaluation, so the last round's stays.
    """
    check_int(num_clients, "num_clients", 1, "Simulate at least one client.")
    check_int(rounds, "rounds", 1, "Run at least one round.")
    check_int(local_steps, "local_steps", 1, "Each client trains at least one step per round.")
    check_int(cpus_per_client, "cpus_per_client", 1, "Give each client at least one core.")
    rule = PersonalLayers.parse(personal)
    if rule.automatic and num_clients < 2:
        raise ValueError("personal='auto' compares clients' updates: it needs at least 2 clients.")
    settings = ClientSettings(local_steps, layer_dropout, tuple(budgets), decide_every, probe_batches, seed)
    initial, groups, module = initial_adapters(task)
    explicit = rule.personal_names(groups, block_positions(module))
    settings.check_budgets([len(stack) for _, stack in find_stacks(module)], num_clients)
    del module
    strategy = PersonalizedFedAvg(
        groups, rule, weighting, agreement_threshold,
        fraction_train=1.0, fraction_evaluate=1.0 if evaluate else 0.0,
        min_train_nodes=num_clients, min_evaluate_nodes=num_clients if evaluate else 0, min_available_nodes=num_clients,
    )
    strategy.personal_names = set(explicit)
    shared_start = {name: tensor for name, tensor in initial.items() if name not in explicit}
    outcome: dict[str, Any] = {}
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            result = strategy.start(
                grid=grid, initial_arrays=ArrayRecord(shared_start), num_rounds=rounds,
                train_config=ConfigRecord({"local-steps": local_steps}),
                evaluate_config=ConfigRecord({"save-dir": save_dir} if save_dir else {}),
            )
            outcome["arrays"] = result.arrays
        except BaseException as error:  # re-raised in the caller's thread
            outcome["error"] = error

    flower = logging.getLogger("flwr")
    level = flower.level
    flower.setLevel(logging.ERROR)  # failed replies are in the round records
    saved_threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(cpus_per_client)
    try:
        run_simulation(
            server_app=server, client_app=make_client_app(task, settings), num_supernodes=num_clients,
            backend_config={
                "client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0},
                # Client logs stay in the actors: failures reach the report as error replies.
                "init_args": {"include_dashboard": False, "logging_level": logging.ERROR, "log_to_driver": False},
            },
        )
    finally:
        flower.setLevel(level)
        if saved_threads is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved_threads
    if "error" in outcome:
        raise outcome["error"]
    final = outcome.get("arrays")
    shared = dict(final.to_torch_state_dict()) if final is not None else {
        n: t for n, t in shared_start.items() if n not in strategy.personal_names
    }
    return FederatedResult(
        rounds=strategy.rounds, shared=shared, personal=sorted(strategy.personal_names), total_tensors=len(initial),
        settings={
            "num_clients": num_clients, "rounds": rounds, "local_steps": local_steps, "personal": personal,
            "layer_dropout": layer_dropout, "budgets": list(budgets), "weighting": weighting,
        },
    )
