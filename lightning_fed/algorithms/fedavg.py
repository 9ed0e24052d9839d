"""FedAvg as an algorithm of the seam: every default of :class:`Algorithm`."""

from __future__ import annotations

from lightning_fed.algorithms.base import Algorithm


class FedAvg(Algorithm):
    """Federated averaging (McMahan et al., "Communication-Efficient Learning of Deep
    Networks from Decentralized Data", AISTATS 2017).

    The new global model is the clients' models averaged with their sample counts as
    weights; clients train as they would alone. ``FedAvgStrategy`` runs it when no
    ``algorithm`` is given.
    """

    name = "fedavg"
