"""The MNIST example's ConvNet in the DP-friendly form the privacy benchmark trains:
tanh instead of relu, dropout off; Opacus accepts it and its per-example gradients
match a batch of one."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[2] / "examples" / "mnist")]

from mnist import ConvNet  # noqa: E402


def test_the_dp_friendly_convnet_is_deterministic_and_opacus_compatible() -> None:
    from opacus import GradSampleModule
    from opacus.validators import ModuleValidator

    torch.manual_seed(0)
    model = ConvNet(activation="tanh", dropout=0.0).train()
    assert ModuleValidator.validate(model, strict=False) == []
    x, y = torch.randn(4, 1, 28, 28), torch.tensor([1, 2, 3, 4])
    out = model(x)
    assert torch.equal(out, model(x))  # no dropout in training mode
    assert torch.allclose(out.exp().sum(1), torch.ones(4), atol=1e-5)
    relu = ConvNet()
    relu.load_state_dict(model.state_dict())
    assert not torch.allclose(relu.eval()(x), model.eval()(x))  # the activation matters

    gsm = GradSampleModule(model.train(), loss_reduction="sum")
    torch.nn.functional.nll_loss(gsm(x), y, reduction="sum").backward()
    per_example = model.fc1.weight.grad_sample[2]  # type: ignore[attr-defined]
    single = ConvNet(activation="tanh", dropout=0.0)
    single.load_state_dict(model.state_dict())
    torch.nn.functional.nll_loss(single(x[2:3]), y[2:3], reduction="sum").backward()
    assert torch.allclose(per_example, single.fc1.weight.grad, atol=1e-5)


def test_the_cosine_schedule_anneals_the_rate_once_an_epoch() -> None:
    conf = ConvNet(lr=0.05, cosine_epochs=4).configure_optimizers()
    optimizer, schedule = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    rates = []
    for _ in range(4):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates == pytest.approx([0.05, 0.05 * 0.8535534, 0.025, 0.05 * 0.1464466])
    assert isinstance(ConvNet().configure_optimizers(), torch.optim.SGD)  # the seed's


def test_bad_settings_are_named() -> None:
    with pytest.raises(ValueError, match=r"activation must be one of \['relu', 'tanh'\]"):
        ConvNet(activation="gelu")
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        ConvNet(dropout=1.0)
    with pytest.raises(ValueError, match="cosine_epochs must be >= 0"):
        ConvNet(cosine_epochs=-1)
