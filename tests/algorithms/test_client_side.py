"""Client-side corrections inside real Lightning Trainers (in this process).

Each correction that an algorithm applies in ``on_before_optimizer_step`` must equal
the gradient of a term added to the loss: FedProx's ``mu/2 ||w - w_global||^2`` and
SCAFFOLD's ``<c - c_i, w>``. The tests train the same model twice, once with the
algorithm's client callback and once with the term written into the loss, under
mixed precision, gradient accumulation and two optimisers (manual optimisation).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_fed.algorithms import ClientRound, FedProx, ModelSpec, Scaffold
from lightning_fed.algorithms.fedprox import proximal_gradient
from lightning_fed.algorithms.scaffold import ScaffoldClient, control_update, mean_gradient

LR = 0.05
Term = Callable[[nn.Module], torch.Tensor]


class Net(L.LightningModule):
    """A small MLP; ``term`` adds a loss term (the reference), ``manual``: two optimisers."""

    def __init__(
        self, manual: bool = False, term: Term | None = None, momentum: float = 0.0
    ) -> None:
        super().__init__()
        self.momentum = momentum
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(5, 8), nn.Tanh())
        self.head = nn.Linear(8, 3)
        self.term = term
        self.automatic_optimization = not manual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def _loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        return loss + self.term(self) if self.term is not None else loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        if self.automatic_optimization:
            return self._loss(batch)
        first, second = self.optimizers()  # type: ignore[misc]
        first.zero_grad()
        second.zero_grad()
        self.manual_backward(self._loss(batch))
        first.step()
        second.step()
        return None

    def configure_optimizers(self) -> Any:
        if self.automatic_optimization:
            return torch.optim.SGD(self.parameters(), lr=LR, momentum=self.momentum)
        return [
            torch.optim.SGD(self.body.parameters(), lr=LR),
            torch.optim.SGD(self.head.parameters(), lr=2 * LR),
        ]


def data() -> DataLoader:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 5, generator=g)
    y = torch.randint(0, 3, (40,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=4)


def fit(model: Net, precision: str, accumulate: int, callbacks: list[Any]) -> None:
    warnings.filterwarnings("ignore")
    trainer = L.Trainer(
        accelerator="cpu",
        precision=precision,  # type: ignore[arg-type]
        accumulate_grad_batches=accumulate,
        max_epochs=2,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
        deterministic=True,
    )
    trainer.fit(model, data())


def spec_of(model: nn.Module) -> ModelSpec:
    return ModelSpec.of(model, list(model.state_dict()))


SETTINGS = [
    pytest.param("32-true", 1, False, id="fp32"),
    pytest.param("16-mixed", 2, False, id="16-mixed-accumulate-2"),
    pytest.param("bf16-mixed", 2, False, id="bf16-mixed-accumulate-2"),
    pytest.param("32-true", 1, True, id="two-optimisers-manual"),
    pytest.param("bf16-mixed", 1, True, id="two-optimisers-bf16"),
]


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-6)


def moved(a: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return any(not torch.equal(v, before[k]) for k, v in a.state_dict().items())


@pytest.mark.parametrize(("precision", "accumulate", "manual"), SETTINGS)
def test_fedprox_correction_is_the_gradient_of_the_proximal_term(
    precision: str, accumulate: int, manual: bool
) -> None:
    mu = 0.5
    anchor_model = Net()
    with torch.no_grad():  # a global model away from the start, so the term matters
        for p in anchor_model.parameters():
            p.add_(0.3)
    anchor = {k: v.clone() for k, v in anchor_model.state_dict().items()}

    ours = Net(manual)
    client = FedProx(mu=mu).client()
    client.start_round(ClientRound(1, ours, spec_of(ours), anchor, {}))
    fit(ours, precision, accumulate, [client])

    def prox(m: nn.Module) -> torch.Tensor:
        return sum((mu / 2) * (p - anchor[n]).square().sum() for n, p in m.named_parameters())  # type: ignore[return-value]

    reference = Net(manual, term=prox)
    fit(reference, precision, accumulate, [])
    plain = Net(manual)
    fit(plain, precision, accumulate, [])
    assert_same_weights(ours, reference)
    diff = max((ours.state_dict()[k] - plain.state_dict()[k]).abs().max() for k in anchor)
    assert diff > 1e-3  # the term changed the training: the test can fail


def test_fedprox_with_mu_0_trains_bit_for_bit_like_no_algorithm() -> None:
    anchor = {k: v + 1.0 for k, v in Net().state_dict().items()}
    ours = Net()
    client = FedProx(mu=0.0).client()
    client.start_round(ClientRound(1, ours, spec_of(ours), anchor, {}))
    fit(ours, "32-true", 1, [client])
    plain = Net()
    fit(plain, "32-true", 1, [])
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in ours.state_dict().items())


def test_proximal_gradient_equals_autograd() -> None:
    w = torch.randn(4, 3, requires_grad=True)
    anchor = torch.randn(4, 3)
    (0.3 / 2 * (w - anchor).square().sum()).backward()
    torch.testing.assert_close(proximal_gradient(w.detach(), anchor, 0.3), w.grad)


def _steps(accumulate: int, manual: bool) -> int:
    batches = 10  # 40 samples, batch 4
    return 2 * (batches if manual else -(-batches // accumulate))


@pytest.mark.parametrize("control", ["displacement", "gradients"])
@pytest.mark.parametrize(("precision", "accumulate", "manual"), SETTINGS)
def test_scaffold_correction_and_control_update(
    precision: str, accumulate: int, manual: bool, control: str
) -> None:
    """Both control estimates give option II's control under plain SGD: ``gradients``
    as the mean raw gradient of the steps, ``displacement`` from how far the model moved."""
    base = Net()
    g = torch.Generator().manual_seed(7)
    names = [n for n, _ in base.named_parameters()]
    c = {f"c/{n}": torch.randn(p.shape, generator=g) * 0.2 for n, p in base.named_parameters()}
    c_local = {n: torch.randn(p.shape, generator=g) * 0.2 for n, p in base.named_parameters()}
    x = {k: v.clone() for k, v in base.state_dict().items()}

    ours = Net(manual)
    client = Scaffold(control=control).client()
    assert isinstance(client, ScaffoldClient) and client.control == control
    client.c_local = {k: v.clone() for k, v in c_local.items()}
    client.start_round(ClientRound(1, ours, spec_of(ours), x, c))
    fit(ours, precision, accumulate, [client])
    changes = client.finish_round(ours)

    def linear(m: nn.Module) -> torch.Tensor:
        return sum(((c[f"c/{n}"] - c_local[n]) * p).sum() for n, p in m.named_parameters())  # type: ignore[return-value]

    reference = Net(manual, term=linear)
    fit(reference, precision, accumulate, [])
    assert_same_weights(ours, reference)
    assert moved(ours, x)

    y = ours.state_dict()
    for n in names:  # option II with the sum of the learning rates of the K steps
        lr = 2 * LR if manual and n.startswith("head") else LR
        expected = c_local[n] - c[f"c/{n}"] + (x[n] - y[n]) / (_steps(accumulate, manual) * lr)
        torch.testing.assert_close(client.c_local[n], expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(changes[f"dc/{n}"], expected - c_local[n], rtol=1e-4, atol=1e-5)
        assert torch.equal(client.before[n], c_local[n])
    assert client.trained_round == 1


def test_scaffold_client_reverts_its_control_when_the_round_is_restarted() -> None:
    model = Net()
    x = {k: v.clone() for k, v in model.state_dict().items()}
    c = {f"c/{n}": torch.ones(p.shape) for n, p in model.named_parameters()}
    client = Scaffold().client()
    assert isinstance(client, ScaffoldClient)
    client.start_round(ClientRound(3, model, spec_of(model), x, c))
    fit(model, "32-true", 1, [client])
    client.finish_round(model)
    after = dict(client.c_local)
    saved = client.state_dict()

    again = Scaffold().client()  # a restarted client process, same state folder
    assert isinstance(again, ScaffoldClient)
    again.load_state_dict(saved)
    again.start_round(
        ClientRound(3, model, spec_of(model), x, c)
    )  # the aggregator restarted round 3
    assert all(torch.equal(again.c_local[n], torch.zeros_like(v)) for n, v in after.items())
    again.start_round(
        ClientRound(4, model, spec_of(model), x, c)
    )  # a new round keeps what round 3 made
    later = Scaffold().client()
    assert isinstance(later, ScaffoldClient)
    later.load_state_dict(saved)
    later.start_round(ClientRound(4, model, spec_of(model), x, c))
    assert all(torch.equal(later.c_local[n], after[n]) for n in after)


def test_control_update_without_steps_keeps_the_control() -> None:
    c_local = torch.randn(3)
    assert torch.equal(
        control_update(c_local, torch.randn(3), torch.randn(3), torch.randn(3), 0.0), c_local
    )
    assert torch.equal(mean_gradient(c_local, torch.randn(3), 0), c_local)
    assert torch.equal(mean_gradient(c_local, torch.full((3,), 6.0), 3), torch.full((3,), 2.0))


def test_scaffold_refuses_an_unknown_control_estimate() -> None:
    from lightning_fed.algorithms import AlgorithmError

    with pytest.raises(AlgorithmError, match="'displacement' is the paper's option II"):
        Scaffold(control="option1")


def test_scaffold_refuses_a_round_without_fitting_controls() -> None:
    from lightning_fed.algorithms import AlgorithmError

    model = Net()
    client = Scaffold().client()
    assert client is not None
    with pytest.raises(AlgorithmError, match=r"server control for 'body\.0\.bias'"):
        client.start_round(ClientRound(1, model, spec_of(model), model.state_dict(), {}))


def test_scaffold_counts_momentum_in_the_control_update() -> None:
    """Option II: with heavy-ball momentum m each step moves a parameter lr / (1 - m) per unit of
    gradient: the control update divides by that, else c_i comes out 10x too large."""
    momentum = 0.9
    base = Net()
    g = torch.Generator().manual_seed(3)
    c = {f"c/{n}": torch.randn(p.shape, generator=g) * 0.1 for n, p in base.named_parameters()}
    x = {k: v.clone() for k, v in base.state_dict().items()}
    ours = Net(momentum=momentum)
    client = Scaffold(control="displacement").client()  # option II
    assert isinstance(client, ScaffoldClient)
    client.start_round(ClientRound(1, ours, spec_of(ours), x, c))
    fit(ours, "32-true", 1, [client])
    client.finish_round(ours)

    def linear(m: nn.Module) -> torch.Tensor:
        return sum((c[f"c/{n}"] * p).sum() for n, p in m.named_parameters())  # type: ignore[return-value]

    reference = Net(term=linear, momentum=momentum)
    fit(reference, "32-true", 1, [])
    assert_same_weights(ours, reference)  # the correction rides the momentum like a gradient
    y = ours.state_dict()
    steps_lr = _steps(1, False) * LR / (1 - momentum)
    for n in client.c_local:
        expected = -c[f"c/{n}"] + (x[n] - y[n]) / steps_lr
        torch.testing.assert_close(client.c_local[n], expected, rtol=1e-4, atol=1e-5)
