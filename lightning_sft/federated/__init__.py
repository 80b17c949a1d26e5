"""Federated fine-tuning on Flower: clients run the user's LightningModule in a Lightning Trainer,
the server averages the shared adapter tensors; personal layers stay on the clients.

Flower (``flwr[simulation]``) is needed: ``pip install "lightning-sft[federated]"``. See docs/federated.md.
"""

from lightning_sft.federated.aggregation import weighted_average
from lightning_sft.federated.client import ClientSettings, FederatedTask, make_client_app
from lightning_sft.federated.server import PersonalizedFedAvg, RoundRecord
from lightning_sft.federated.sharing import PersonalLayers, agreement, choose_personal
from lightning_sft.federated.simulation import FederatedResult, run_federated

__all__ = [
    "ClientSettings",
    "FederatedResult",
    "FederatedTask",
    "PersonalLayers",
    "PersonalizedFedAvg",
    "RoundRecord",
    "agreement",
    "choose_personal",
    "make_client_app",
    "run_federated",
    "weighted_average",
]
