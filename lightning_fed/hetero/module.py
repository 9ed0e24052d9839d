"""``HeteroNNModule``: split learning written as one LightningModule per party.

Every party subclasses the same kind of module and sets, in ``__init__``:

- ``self.feature_model``: the bottom model over this party's columns (every party);
- ``self.inference_model``: the top model (the host only; None elsewhere).

The host combines the parties' feature tensors with :meth:`HeteroNNModule.fuse`
(keyed by each party's ``feature_key``), runs the inference model and
:meth:`HeteroNNModule.loss`. The framework writes the steps: a collaborator's
training step sends its features and turns the gradient the host returns into its
own backward pass; the host's gathers the features and, after Lightning's backward,
returns each collaborator the gradient of its tensor. Optimisers, schedulers,
loggers and callbacks are the user's, as in any LightningModule.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn
from typing_extensions import override

from lightning_fed.channel import Channel
from lightning_fed.errors import SettingError
from lightning_fed.hetero.data import HeteroBatch, HeteroDataModule
from lightning_fed.hetero.link import CollaboratorLink, HeteroError, HostLink
from lightning_fed.hetero.order import batch_digest, batches

#: Training steps of one epoch get rounds ``epoch * STEP_ROUNDS + batch_idx``.
STEP_ROUNDS = 1_000_000
#: The round of the evaluation features of ``trainer.test`` (validation uses the epoch),
#: above every epoch, so that features of a validation the host skipped count as late.
TEST_ROUND = 2**53


class HeteroNNModule(pl.LightningModule):
    """Base class of a HeteroNN party's model (see the module docstring).

    Args:
        feature_key: this party's name in :meth:`fuse`'s dictionary (e.g. "left").
        is_feature_trainable: False freezes this party's feature model (the seed's
            ``is_feature_trainable``): its features are still sent, never updated.
    """

    feature_model: nn.Module
    inference_model: nn.Module | None

    def __init__(self, feature_key: str, is_feature_trainable: bool = True) -> None:
        super().__init__()
        # An instance attribute, not a class default: nn.Module looks submodules up only
        # when normal attribute lookup fails, so a class-level None would hide them.
        self.inference_model = None
        if not isinstance(feature_key, str) or not feature_key:
            raise SettingError(f"feature_key must be a non-empty string, got {feature_key!r}")
        self.feature_key = feature_key
        self.is_feature_trainable = is_feature_trainable
        self._link: HostLink | CollaboratorLink | None = None
        self._pending: tuple[int, str, dict[str, torch.Tensor]] | None = None
        self._eval: list[dict[str, torch.Tensor]] = []
        self._eval_sent: list[tuple[str, torch.Tensor]] = []

    # -- what the user may override ------------------------------------------------------
    def forward_features(self, data: Any) -> torch.Tensor:
        """This party's features of a batch: ``feature_model`` applied to its inputs."""
        features: torch.Tensor = self.feature_model(self.inputs(data))
        return features

    def inputs(self, data: Any) -> Any:
        """The feature model's input in a batch's data (the host's data is (x, label))."""
        return data[0] if self.is_host else data

    def labels(self, data: Any) -> torch.Tensor:
        """The labels in the host's batch data."""
        labels: torch.Tensor = data[1]
        return labels

    def fuse(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """Combine every party's features (by feature key) into the inference model's input.

        The default adds them up, so every feature model must output the same width.
        """
        return torch.stack([features[k] for k in sorted(features)]).sum(dim=0)

    def loss(self, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The training loss (default: cross-entropy; on log-probabilities it equals NLL)."""
        return F.cross_entropy(output, labels)

    def log_metrics(self, stage: str, output: torch.Tensor, labels: torch.Tensor) -> None:
        """Log ``{stage}_loss`` and, for class scores, ``{stage}_acc`` (host only)."""
        self.log(f"{stage}_loss", self.loss(output, labels), prog_bar=True)
        if output.ndim == 2 and not labels.is_floating_point():
            acc = (output.argmax(dim=1) == labels).float().mean()
            self.log(f"{stage}_acc", acc, prog_bar=True)

    # -- roles --------------------------------------------------------------------------
    @property
    def is_host(self) -> bool:
        """Whether this party holds the labels and the inference model."""
        return self.inference_model is not None

    def make_link(
        self,
        channel: Channel,
        *,
        role: str,
        host: str,
        collaborators: Sequence[str],
        session: str,
        timeout: float,
    ) -> HostLink | CollaboratorLink:
        """The exchange for this party's ``role`` (called by the strategy; the secure
        module returns its encrypted one)."""
        self._check_role(role)
        if role == "host":
            return HostLink(channel, collaborators, self.feature_key, session, timeout)
        return CollaboratorLink(channel, host, self.feature_key, session, timeout)

    def _check_role(self, role: str) -> None:
        if (role == "host") != self.is_host:
            has = "has" if self.is_host else "has no"
            raise HeteroError(
                f"this party runs as a {role}, but its module {has} inference_model; hint: "
                "set self.inference_model on the host only"
            )

    def connect(self, link: HostLink | CollaboratorLink) -> None:
        """Called by the strategy: the exchange this party's steps use."""
        self._check_role("host" if isinstance(link, HostLink) else "collaborator")
        self._link = link

    def _host_link(self) -> HostLink:
        if not isinstance(self._link, HostLink):
            raise HeteroError("no host link: train a HeteroNNModule with HeteroNNStrategy")
        return self._link

    def _collaborator_link(self) -> CollaboratorLink:
        if not isinstance(self._link, CollaboratorLink):
            raise HeteroError("no collaborator link: train a HeteroNNModule with HeteroNNStrategy")
        return self._link

    def _local(self, tensor: torch.Tensor) -> torch.Tensor:
        """A received tensor on this module's device, in its dtype."""
        dtype = self.dtype if isinstance(self.dtype, torch.dtype) else None
        return tensor.to(device=self.device, dtype=dtype)

    def _head(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        assert self.inference_model is not None
        output: torch.Tensor = self.inference_model(self.fuse(features))
        return output

    # -- training -----------------------------------------------------------------------
    @override
    def training_step(self, batch: HeteroBatch, batch_idx: int) -> torch.Tensor | None:
        step = self.current_epoch * STEP_ROUNDS + batch_idx
        digest = batch.digest
        if not self.is_host:
            link = self._collaborator_link()
            z = self.forward_features(batch.data)
            link.send(step, digest, z)
            grad = link.gradient(step, digest, like=z)
            if grad is None:  # the host stopped mid epoch
                self.trainer.should_stop = True
                return None
            if not self.is_feature_trainable:
                return None  # Lightning skips backward and the optimizer step
            return (z * grad).sum()  # its gradient with respect to z is the host's gradient
        others = self._host_link().gather(step, digest, rows=len(batch))
        leaves = {k: self._local(v).requires_grad_(True) for k, v in others.items()}
        own = self.forward_features(batch.data)
        output = self._head({self.feature_key: own, **leaves})
        labels = self.labels(batch.data)
        loss = self.loss(output, labels)
        self.log("train_loss", loss, prog_bar=True)
        self._pending = (step, digest, leaves)
        return loss

    @override
    def on_after_backward(self) -> None:
        if self.is_host and self._pending is not None:
            step, digest, leaves = self._pending
            self._pending = None
            grads = {k: v.grad for k, v in leaves.items() if v.grad is not None}
            self._host_link().scatter(step, digest, grads)

    # -- evaluation -----------------------------------------------------------------------
    @property
    def _fitting(self) -> bool:
        return self.trainer.state.fn == TrainerFn.FITTING

    def _eval_round(self) -> int:
        return TEST_ROUND if self.trainer.testing else self.current_epoch

    def _eval_digests(self) -> list[str]:
        data = getattr(self.trainer, "datamodule", None)
        if not isinstance(data, HeteroDataModule) or data.test_ids is None:
            raise HeteroError("evaluation needs a HeteroDataModule aligned by HeteroNNStrategy")
        return [batch_digest(b) for b in batches(data.test_ids, data.batch_size)]

    def _on_eval_start(self) -> None:
        if self.is_host:
            link = self._host_link()
            if self._fitting and self.trainer.should_stop:
                # Stopping mid epoch, Lightning validates first; collaborators waiting for a
                # gradient learn to stop, and to validate as well.
                link.announce(self.current_epoch, stop=True, evaluate=True)
            gathered = link.gather_eval(self._eval_round(), self._eval_digests())
            self._eval = [{k: self._local(v) for k, v in b.items()} for b in gathered]
        else:
            self._eval_sent = []

    def _eval_step(self, batch: HeteroBatch, batch_idx: int, stage: str) -> None:
        z = self.forward_features(batch.data)
        if not self.is_host:
            self._eval_sent.append((batch.digest, z.detach()))
            return
        if batch_idx >= len(self._eval):
            raise HeteroError(f"no collaborator features for evaluation batch {batch_idx}")
        output = self._head({self.feature_key: z, **self._eval[batch_idx]})
        self.log_metrics(stage, output, self.labels(batch.data))

    def _on_eval_end(self) -> None:
        link = self._link
        skipped = (
            isinstance(link, CollaboratorLink)
            and self._fitting
            and link.stopped
            and not link.stop_evaluates
        )
        if not self.is_host and not skipped:
            digests = [d for d, _ in self._eval_sent]
            self._collaborator_link().send_eval(
                self._eval_round(), digests, [z for _, z in self._eval_sent]
            )
            self._eval_sent = []
        self._eval = []

    @override
    def on_validation_epoch_start(self) -> None:
        self._on_eval_start()

    @override
    def validation_step(self, batch: HeteroBatch, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "val")

    @override
    def on_validation_epoch_end(self) -> None:
        self._on_eval_end()

    @override
    def on_test_epoch_start(self) -> None:
        self._on_eval_start()

    @override
    def test_step(self, batch: HeteroBatch, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "test")

    @override
    def on_test_epoch_end(self) -> None:
        self._on_eval_end()
