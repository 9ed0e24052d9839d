"""The per-batch exchange of split learning over a real channel (a local folder)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from lightning_fed.channel import Channel, NodeIdentity, TaskConfig
from lightning_fed.hetero.link import CollaboratorLink, HeteroError, HostLink


@pytest.fixture
def links(tmp_path: Path) -> tuple[HostLink, CollaboratorLink, Channel]:
    ids = {n: NodeIdentity.generate(n) for n in ("host", "lab")}
    task = TaskConfig("t", {n: i.public_key_text for n, i in ids.items()})
    url = str(tmp_path / "channel")
    host_ch = Channel(url, task, ids["host"]).connect()
    lab_ch = Channel(url, task, ids["lab"]).connect()
    host = HostLink(host_ch, ["lab"], "left", "s1", timeout=5)
    lab = CollaboratorLink(lab_ch, "host", "right", "s1", timeout=5)
    return host, lab, lab_ch


def test_features_up_gradients_down_evaluation_and_epochs(links) -> None:
    host, lab, _ = links
    z = torch.randn(4, 3)
    lab.send(0, "d0", z)
    got = host.gather(0, "d0", rows=4)
    assert list(got) == ["right"] and torch.equal(got["right"], z)
    g = torch.randn(4, 3)
    host.scatter(0, "d0", {"right": g})
    assert torch.equal(lab.gradient(0, "d0", like=z), g)
    evals = [torch.randn(4, 3), torch.randn(2, 3)]
    lab.send_eval(1, ["e0", "e1"], evals)
    per_batch = host.gather_eval(1, ["e0", "e1"])
    assert [torch.equal(b["right"], e) for b, e in zip(per_batch, evals)] == [True, True]
    host.announce(1, stop=False)
    host.announce(2, stop=True)
    assert lab.epoch_ended(1) is False and lab.epoch_ended(2) is True


def test_a_batch_mismatch_names_the_party_and_both_batches(links) -> None:
    host, lab, _ = links
    lab.send(3, "abcdef0123456789", torch.zeros(2, 2))
    with pytest.raises(HeteroError, match=r"'lab' sent features of batch abcdef012345 for step 3"):
        host.gather(3, "ffffffffffffffff", rows=2)


@pytest.mark.parametrize(
    ("tensor", "words"),
    [
        (torch.tensor([[1.0, math.nan]]), "NaN or Inf"),
        (torch.zeros(3, 2), r"shape \(3, 2\) for a batch of 1 samples"),
        (torch.zeros(1, 2, dtype=torch.int64), "dtype torch.int64"),
    ],
)
def test_bad_features_stop_the_run_with_the_reason(links, tensor, words) -> None:
    host, lab, _ = links
    lab.send(0, "d", tensor)
    with pytest.raises(HeteroError, match=words):
        host.gather(0, "d", rows=1)


def test_silence_is_a_timeout_naming_the_party_and_step(links) -> None:
    host, _, _ = links
    host.timeout = 0.3
    with pytest.raises(
        HeteroError, match=r"no features from lab within calculation_timeout=0.3 s \(step 4\)"
    ):
        host.gather(4, "d", rows=1)


def test_a_message_of_another_run_is_dropped(links) -> None:
    host, lab, lab_ch = links
    stale = CollaboratorLink(lab_ch, "host", "right", "old-run", timeout=5)
    stale.send(0, "d", torch.ones(1, 2))
    lab.send(0, "d", torch.zeros(1, 2))
    assert torch.equal(host.gather(0, "d", rows=1)["right"], torch.zeros(1, 2))


def test_gradients_must_fit_and_exist(links) -> None:
    host, lab, _ = links
    with pytest.raises(HeteroError, match="before any features came from 'lab'"):
        host.scatter(0, "d", {})
    lab.send(0, "d", torch.zeros(2, 3))
    host.gather(0, "d", rows=2)
    with pytest.raises(HeteroError, match="the loss does not depend on them"):
        host.scatter(0, "d", {})
    host.scatter(0, "d", {"right": torch.zeros(2, 5)})
    with pytest.raises(
        HeteroError, match=r"gradient of shape \(2, 5\) for features of shape \(2, 3\)"
    ):
        lab.gradient(0, "d", like=torch.zeros(2, 3))
    host.scatter(1, "other", {"right": torch.zeros(2, 3)})
    with pytest.raises(HeteroError, match="the gradient of batch other for step 1"):
        lab.gradient(1, "d", like=torch.zeros(2, 3))


def test_feature_keys_must_be_distinct_and_stable(links) -> None:
    host, lab, lab_ch = links
    clash = CollaboratorLink(lab_ch, "host", "left", "s1", timeout=5)  # the host's own key
    clash.send(0, "d", torch.zeros(1, 2))
    with pytest.raises(HeteroError, match="uses feature_key 'left', as the host does"):
        host.gather(0, "d", rows=1)
    lab.send(1, "d", torch.zeros(1, 2))
    assert list(host.gather(1, "d", rows=1)) == ["right"]
    CollaboratorLink(lab_ch, "host", "other", "s1", timeout=5).send(2, "d", torch.zeros(1, 2))
    with pytest.raises(HeteroError, match="changed its feature_key from 'right' to 'other'"):
        host.gather(2, "d", rows=1)
