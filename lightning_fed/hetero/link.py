"""The per-batch exchange of split learning: features up, gradients down, checked.

No Lightning here. For training step ``s`` every collaborator sends the host its
feature tensor for the batch (``features``, round ``s``), tagged with the batch's
ID digest and its ``feature_key``; the host checks each one against its own batch
and, after its backward pass, sends each collaborator the gradient of its tensor
(``gradient``, round ``s``). For evaluation a collaborator sends all its batches'
features in one message (``eval-features``), saving round trips. At the start of
the next epoch, or when training ends, the host tells the collaborators whether to go
on (``epoch``); a stop may also come in place of a gradient when the host stops mid
epoch (``max_steps``, ``max_time``).

Before training, every collaborator offers the host its context (batch size, split
sizes, recovery checkpoints: ``hetero-offer``) and the host answers with the plan
every party follows (the epoch to resume after, the validation schedule:
``hetero-plan``).

Every message carries the run's ``session`` id; one from another run is dropped.
Every wait has a deadline, and a timeout or a bad tensor is a :class:`HeteroError`
that names the party, the step and the batch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch

from lightning_fed.channel import BlobIntegrityError, Channel, ChannelTimeoutError, Message
from lightning_fed.errors import LightningFedError

log = logging.getLogger(__name__)

FEATURES, GRADIENT, EVAL_FEATURES, EPOCH = "features", "gradient", "eval-features", "epoch"
ABORT = "abort"
OFFER, PLAN = "hetero-offer", "hetero-plan"


class HeteroError(LightningFedError, RuntimeError):
    """Split learning cannot go on: a party is silent, misaligned or sent bad tensors."""


def _short(digest: str) -> str:
    return digest[:12]


def check_tensor(
    tensor: torch.Tensor | None, *, rows: int, party: str, what: str, width: int | None = None
) -> torch.Tensor:
    """``tensor`` if it is a finite floating-point ``(rows, ...)`` tensor, else HeteroError."""
    if tensor is None:
        raise HeteroError(f"{party} sent {what} without its tensor")
    if not tensor.is_floating_point():
        raise HeteroError(f"{party} sent {what} of dtype {tensor.dtype}; a float tensor is needed")
    if tensor.ndim < 1 or tensor.shape[0] != rows:
        raise HeteroError(
            f"{party} sent {what} of shape {tuple(tensor.shape)} for a batch of {rows} samples"
        )
    if width is not None and tuple(tensor.shape[1:]) != (width,):
        raise HeteroError(
            f"{party} sent {what} of shape {tuple(tensor.shape)}; expected ({rows}, {width})"
        )
    if not bool(torch.isfinite(tensor).all()):
        raise HeteroError(f"{party} sent {what} holding NaN or Inf; the run stops")
    return tensor


@dataclass(frozen=True)
class Offer:
    """What a party brings to the start of training: its batching and its checkpoints."""

    batch_size: int
    train_size: int
    test_size: int
    checkpoints: list[int] = field(default_factory=list)
    """Epochs after which this party holds a recovery checkpoint (empty without recovery)."""


@dataclass(frozen=True)
class Plan:
    """What the host decides for every party before training."""

    resume_epoch: int | None
    """Resume after this completed epoch (every party holds its checkpoint), or None."""
    check_val_every_n_epoch: int | None
    """The host's validation schedule, which collaborators follow."""


def common_checkpoint(offers: Sequence[Offer]) -> int | None:
    """The last epoch whose checkpoint every party holds, or None."""
    common = set(offers[0].checkpoints) if offers else set()
    for offer in offers[1:]:
        common &= set(offer.checkpoints)
    return max(common) if common else None


class Link:
    """What both sides share: session-bound sends, deadlines on receives, aborts.

    ``seconds`` adds up the time spent in the exchange (sending, and waiting for and
    reading the other parties' messages), for the per-epoch report.
    """

    def __init__(self, channel: Channel, session: str, timeout: float) -> None:
        self.channel = channel
        self.session = session
        self.timeout = timeout
        self.seconds = 0.0
        self.phases: dict[str, float] = {}
        """Seconds of this party's work by phase (the secure layer's: ``encrypt``,
        ``decrypt``, ``he``, and ``*_eval`` for evaluation)."""

    def handshake(self, batch_size: int) -> None:
        """Exchange what the protocol needs before the first batch (nothing here)."""

    def _timed(self, phase: str, start: float) -> None:
        self.phases[phase] = self.phases.get(phase, 0.0) + time.perf_counter() - start

    def _send(
        self,
        kind: str,
        to: str | list[str],
        step: int,
        body: Mapping[str, object],
        tensors: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        start = time.perf_counter()
        payload = {"session": self.session, **body}
        detached = None if tensors is None else {k: v.detach().cpu() for k, v in tensors.items()}
        # Per-batch messages skip fsync: a restart regenerates them from checkpoints.
        self.channel.send(kind, payload, to=to, round=step, tensors=detached, durable=False)
        self.seconds += time.perf_counter() - start

    def _receive(
        self, kind: str, sender: str | list[str], step: int, what: str, *, stop: bool = False
    ) -> Message:
        """The next ``kind`` message of round ``step`` from ``sender``, or an abort.

        With ``stop``, a stop word of the host (an ``epoch`` message that stops
        training) is returned too, whatever its round.
        """
        start = time.perf_counter()
        try:
            return self._wait(kind, sender, step, what, stop)
        finally:
            self.seconds += time.perf_counter() - start

    def _wait(
        self, kind: str, sender: str | list[str], step: int, what: str, stop: bool
    ) -> Message:
        kinds = [kind, ABORT, EPOCH] if stop else [kind, ABORT]
        deadline = time.monotonic() + self.timeout
        while True:
            left = deadline - time.monotonic()
            try:
                if left <= 0:
                    raise ChannelTimeoutError(what, [], self.timeout)
                msg = self.channel.receive(kinds, sender=sender, timeout=left)
            except ChannelTimeoutError:
                who = sender if isinstance(sender, str) else ", ".join(sender)
                raise HeteroError(
                    f"no {what} from {who} within calculation_timeout={self.timeout:g} s "
                    f"(step {step}); hint: check that party's log, or raise calculation_timeout"
                ) from None
            except BlobIntegrityError as exc:
                raise HeteroError(f"{what} from {exc.sender} is corrupt: {exc.reason}") from None
            if msg.body.get("session") != self.session:
                log.info(
                    "%s: dropped %s of another run from %s", self.channel.node_id, kind, msg.sender
                )
                continue
            if msg.kind == ABORT:
                raise HeteroError(
                    f"{msg.sender} stopped the run: {msg.body.get('reason', 'no reason given')}"
                )
            if msg.kind != kind:  # a word of the host's (stop is set)
                if msg.body.get("stop"):
                    return msg
                continue  # an earlier epoch's word to go on, already acted upon
            if msg.round < step:
                log.info("%s: dropped a late %s of round %d", self.channel.node_id, kind, msg.round)
                continue
            if msg.round > step:
                raise HeteroError(
                    f"{msg.sender} sent {what} of round {msg.round} while this party is at "
                    f"{step}: the parties are out of step"
                )
            return msg

    def abort(self, peers: Sequence[str], reason: str) -> None:
        """Tell ``peers`` that this party stopped, so that none waits for its timeout."""
        if peers:
            body = {"session": self.session, "reason": reason[:4000]}
            self.channel.send(ABORT, body, to=list(peers))


class HostLink(Link):
    """The host's side: gather features, scatter gradients, lead the epochs.

    Each collaborator names its ``feature_key`` in its messages; the host keys the
    features it gathers by them.

    Args:
        channel: the host's connected channel.
        collaborators: the collaborators' node ids.
        own_key: the host's own feature key (no collaborator may use it).
        session: the run's id (the same on every party).
        timeout: seconds to wait for any one message (``calculation_timeout``).
    """

    def __init__(
        self,
        channel: Channel,
        collaborators: Sequence[str],
        own_key: str,
        session: str,
        timeout: float,
    ) -> None:
        super().__init__(channel, session, timeout)
        self.collaborators = sorted(collaborators)
        self.own_key = own_key
        self.keys: dict[str, str] = {}  # node -> feature key, learned from its messages
        self.stop_sent = False

    def _key(self, msg: Message) -> str:
        key = msg.body.get("key")
        if not isinstance(key, str) or not key:
            raise HeteroError(f"collaborator {msg.sender!r} sent {msg.kind} without a feature_key")
        known = self.keys.get(msg.sender)
        if known is None:
            clash = [n for n, k in self.keys.items() if k == key]
            if key == self.own_key or clash:
                other = "the host" if key == self.own_key else repr(clash[0])
                raise HeteroError(
                    f"collaborator {msg.sender!r} uses feature_key {key!r}, as {other} does; "
                    "hint: give every party its own feature_key"
                )
            self.keys[msg.sender] = key
        elif key != known:
            raise HeteroError(
                f"collaborator {msg.sender!r} changed its feature_key from {known!r} to {key!r}"
            )
        return key

    @staticmethod
    def _check_batch(msg: Message, step: int, digest: str) -> None:
        theirs = msg.body.get("digest")
        if theirs != digest:
            raise HeteroError(
                f"collaborator {msg.sender!r} sent features of batch {_short(str(theirs))} for "
                f"step {step}, but the host's batch {step} is {_short(digest)}: the parties' "
                "batches disagree; hint: use the same batch_size, seed and test_fraction, "
                "and the same intersection, on every party"
            )

    @staticmethod
    def _check_eval_batches(msg: Message, digests: Sequence[str]) -> None:
        if msg.body.get("digests") != list(digests):
            raise HeteroError(
                f"collaborator {msg.sender!r} sent evaluation features of other batches than "
                f"the host's ({len(msg.body.get('digests') or [])} vs {len(digests)} batches); "
                "hint: use the same batch_size, seed and test_fraction on every party"
            )

    def gather(self, step: int, digest: str, rows: int) -> dict[str, torch.Tensor]:
        """Every collaborator's features for training step ``step``, by feature key."""
        got: dict[str, torch.Tensor] = {}
        for node in self.collaborators:
            msg = self._receive(FEATURES, node, step, "features")
            key = self._key(msg)
            self._check_batch(msg, step, digest)
            what = f"features for step {step}"
            got[key] = check_tensor(
                msg.tensors.get("z"), rows=rows, party=f"collaborator {node!r}", what=what
            )
        return got

    def scatter(self, step: int, digest: str, gradients: Mapping[str, torch.Tensor]) -> None:
        """Send each collaborator the gradient of its features (``gradients`` by feature key)."""
        for node in self.collaborators:
            key = self.keys.get(node)
            if key is None:
                raise HeteroError(f"scatter() before any features came from {node!r}")
            grad = gradients.get(key)
            if grad is None:
                raise HeteroError(
                    f"no gradient for the features of {node!r} (feature key {key!r}) at step "
                    f"{step}: the loss does not depend on them; hint: fuse every party's features"
                )
            self._send(GRADIENT, node, step, {"digest": digest}, {"g": grad})

    def gather_eval(self, epoch: int, digests: Sequence[str]) -> list[dict[str, torch.Tensor]]:
        """Every collaborator's features for all evaluation batches, batch by batch."""
        per_batch: list[dict[str, torch.Tensor]] = [{} for _ in digests]
        for node in self.collaborators:
            msg = self._receive(EVAL_FEATURES, node, epoch, "evaluation features")
            key = self._key(msg)
            self._check_eval_batches(msg, digests)
            for i in range(len(digests)):
                z = msg.tensors.get(f"z{i}")
                if z is None:
                    raise HeteroError(f"{node!r} sent no features for evaluation batch {i}")
                per_batch[i][key] = check_tensor(
                    z, rows=len(z), party=f"collaborator {node!r}", what=f"evaluation batch {i}"
                )
        return per_batch

    def plan(self, own: Offer, check_val_every_n_epoch: int | None) -> Plan:
        """Check every collaborator's offer against the host's and send them the plan."""
        offers = [own]
        for node in self.collaborators:
            msg = self._receive(OFFER, node, 0, "context (batch size, split, checkpoints)")
            try:
                offer = Offer(**msg.body["offer"])
            except (KeyError, TypeError) as exc:
                raise HeteroError(f"collaborator {node!r} sent a malformed offer: {exc}") from None
            for name in ("batch_size", "train_size", "test_size"):
                theirs, ours = getattr(offer, name), getattr(own, name)
                if theirs != ours:
                    raise HeteroError(
                        f"collaborator {node!r} has {name}={theirs}, the host {ours}: every "
                        "party must batch and split the common IDs alike; hint: use the same "
                        "batch_size, test_fraction and seed (or split_dataset) on every party"
                    )
            offers.append(offer)
        resume = common_checkpoint(offers)
        if own.checkpoints and resume is None:
            log.warning(
                "host: not every party holds a checkpoint of the same epoch (host: %s); "
                "training starts over",
                own.checkpoints,
            )
        plan = Plan(resume, check_val_every_n_epoch)
        self._send(PLAN, self.collaborators, 0, {"plan": asdict(plan)})
        return plan

    def announce(self, epoch: int, stop: bool, evaluate: bool = False) -> None:
        """Tell every collaborator whether training goes on after ``epoch``.

        A stop is sent once. ``evaluate`` tells collaborators that the host validates
        before it stops (Lightning does when a callback stops training mid epoch).
        """
        if self.stop_sent:
            return
        self._send(EPOCH, self.collaborators, epoch, {"stop": bool(stop), "evaluate": evaluate})
        self.stop_sent = bool(stop)


class CollaboratorLink(Link):
    """A collaborator's side: send features, receive their gradient, follow the epochs."""

    def __init__(
        self, channel: Channel, host: str, feature_key: str, session: str, timeout: float
    ) -> None:
        super().__init__(channel, session, timeout)
        self.host = host
        self.feature_key = feature_key
        self.stopped = False  # the host stopped training mid epoch
        self.stop_evaluates = False  # ... and validates before it stops

    def plan(self, own: Offer) -> Plan:
        """Offer the host this party's context and follow the plan it sends back."""
        self._send(OFFER, self.host, 0, {"offer": asdict(own)})
        msg = self._receive(PLAN, self.host, 0, "plan")
        try:
            return Plan(**msg.body["plan"])
        except (KeyError, TypeError) as exc:
            raise HeteroError(f"the host sent a malformed plan: {exc}") from None

    def send(self, step: int, digest: str, features: torch.Tensor) -> None:
        """Send this batch's features to the host."""
        body = {"digest": digest, "key": self.feature_key}
        self._send(FEATURES, self.host, step, body, {"z": features})

    def gradient(self, step: int, digest: str, like: torch.Tensor) -> torch.Tensor | None:
        """The gradient of this batch's features, checked against their shape.

        None when the host stopped training instead (mid epoch: ``max_steps``, ``max_time``).
        """
        msg = self._receive(GRADIENT, self.host, step, "gradient", stop=True)
        if self._stop_word(msg):
            return None
        self._check_batch(msg, step, digest)
        grad = check_tensor(
            msg.tensors.get("g"), rows=like.shape[0], party=f"host {self.host!r}", what="gradient"
        )
        if grad.shape != like.shape:
            raise HeteroError(
                f"host {self.host!r} sent a gradient of shape {tuple(grad.shape)} for features "
                f"of shape {tuple(like.shape)}"
            )
        return grad.to(device=like.device, dtype=like.dtype)

    def _stop_word(self, msg: Message) -> bool:
        """Whether ``msg`` is the host's word to stop (mid epoch); remembers it."""
        if msg.kind != EPOCH:
            return False
        self.stopped = True
        self.stop_evaluates = bool(msg.body.get("evaluate", False))
        return True

    def _check_batch(self, msg: Message, step: int, digest: str) -> None:
        if msg.body.get("digest") != digest:
            raise HeteroError(
                f"the host sent the {msg.kind} of batch {_short(str(msg.body.get('digest')))} "
                f"for step {step}, but this party's batch is {_short(digest)}"
            )

    def send_eval(
        self, epoch: int, digests: Sequence[str], features: Sequence[torch.Tensor]
    ) -> None:
        """Send the features of every evaluation batch at once."""
        tensors = {f"z{i}": z for i, z in enumerate(features)}
        body = {"digests": list(digests), "key": self.feature_key}
        self._send(EVAL_FEATURES, self.host, epoch, body, tensors)

    def epoch_ended(self, epoch: int) -> bool:
        """Wait for the host's word on ``epoch``; True if training stops."""
        msg = self._receive(EPOCH, self.host, epoch, "word to go on after the epoch")
        return bool(msg.body.get("stop", False))
