"""What a user sets to get differential privacy: on the aggregator (central, or distributed
with secure aggregation) or on a client (local DP-SGD through Opacus)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from lightning_fed.algorithms.base import check_number
from lightning_fed.errors import SettingError
from lightning_fed.privacy.accounting import ACCOUNTANTS, require_opacus


def _delta(owner: str, delta: object) -> float:
    return check_number(f"{owner}: delta", delta, above=0, below=1)  # type: ignore[arg-type]


def _target(owner: str, target: object) -> float | None:
    if target is None:
        return None
    return check_number(f"{owner}: target_epsilon", target, above=0)  # type: ignore[arg-type]


def _accountant(owner: str, kind: object) -> str:
    try:
        require_opacus()  # the accountants (and LocalDP's DP-SGD) are Opacus'
    except ImportError as exc:
        raise SettingError(f"{owner}: {exc}") from None
    if kind not in ACCOUNTANTS:
        raise SettingError(
            f"{owner}: accountant must be one of {', '.join(map(repr, ACCOUNTANTS))}, got "
            f"{kind!r}; hint: 'rdp' is Opacus' default, 'prv' is tighter and slower"
        )
    return str(kind)


@dataclass(frozen=True)
class AdaptiveClipping:
    """Adaptive clipping (Andrew et al., NeurIPS 2021): the clipping bound follows a
    quantile of the clients' update norms instead of being guessed.

    Each round the aggregator counts the clients whose update's norm was at most the
    bound, adds Gaussian noise of standard deviation ``count_stddev`` to the count, and
    moves the bound geometrically: ``clip *= exp(-learning_rate * (fraction -
    target_quantile))``. The count's noise takes part of the privacy budget, so the
    updates get a slightly larger share of noise (see
    :func:`~lightning_fed.privacy.dp.update_noise_multiplier`).

    Args:
        initial: the first round's bound (an update's L2 norm).
        target_quantile: the fraction of updates that should fit unclipped.
        learning_rate: the geometric step size (the paper's 0.2).
        count_stddev: the count's noise (None: clients per round / 20, the paper's choice).
    """

    initial: float = 0.1
    target_quantile: float = 0.5
    learning_rate: float = 0.2
    count_stddev: float | None = None

    def __post_init__(self) -> None:
        check_number("AdaptiveClipping: initial", self.initial, above=0)
        check_number("AdaptiveClipping: target_quantile", self.target_quantile, above=0, below=1)
        check_number("AdaptiveClipping: learning_rate", self.learning_rate, above=0)
        if self.count_stddev is not None:
            check_number("AdaptiveClipping: count_stddev", self.count_stddev, above=0)

    def stddev_for(self, clients: int) -> float:
        """The count's noise for rounds of ``clients`` clients."""
        return self.count_stddev if self.count_stddev is not None else clients / 20


class DifferentialPrivacy:
    """Differentially private FedAvg (DP-FedAvg, McMahan et al., ICLR 2018): each client's
    update is clipped to an L2 norm and Gaussian noise is added to their sum, so the
    global model hides whether any one client took part (client-level DP).

    Set it on the aggregator. Without secure aggregation it is **central DP**: the
    aggregator sees each update, clips it and adds the noise, so clients must trust it.
    With ``secure_aggregation`` it is **distributed DP**: each client clips its own
    update and adds its share of the noise (standard deviation ``noise_multiplier *
    clip / sqrt(clients)``) before masking, and the aggregator learns only the noised
    sum. Updates are averaged with equal weight (a client's sample count would
    otherwise scale its influence beyond the bound).

    The privacy spent is counted with Opacus' accountant, each round a Gaussian
    mechanism on a sample of the federation's clients (rate = the round's clients /
    all clients); epsilon is logged every round (``dp/epsilon``) and kept in
    ``report.json``. See docs/privacy.md for what this does and does not promise.

    Args:
        noise_multiplier: the noise's standard deviation over the clipping bound (None:
            the smallest that spends at most ``target_epsilon`` in the planned rounds,
            computed when the clients are known).
        clip: the bound on each update's L2 norm, or :class:`AdaptiveClipping` (central
            DP only).
        delta: the delta at which epsilon is reported (below 1 / clients).
        target_epsilon: stop before a round would spend more than this.
        accountant: ``"rdp"`` or ``"prv"`` (Opacus' accountants).
    """

    def __init__(
        self,
        noise_multiplier: float | None = None,
        clip: float | AdaptiveClipping = 1.0,
        delta: float = 1e-5,
        target_epsilon: float | None = None,
        accountant: str = "rdp",
    ) -> None:
        owner = "DifferentialPrivacy"
        if noise_multiplier is None and target_epsilon is None:
            raise SettingError(
                f"{owner}: give noise_multiplier, target_epsilon or both; hint: "
                "DifferentialPrivacy(target_epsilon=8.0) picks the noise for the planned rounds"
            )
        if noise_multiplier is not None:
            check_number(f"{owner}: noise_multiplier", noise_multiplier, at_least=0)
            if noise_multiplier == 0 and target_epsilon is not None:
                raise SettingError(
                    f"{owner}: noise_multiplier=0 spends an infinite epsilon in one round, so "
                    f"target_epsilon={target_epsilon!r} can never be kept; hint: drop "
                    "noise_multiplier to let the target pick it"
                )
        if not isinstance(clip, AdaptiveClipping):
            check_number(f"{owner}: clip", clip, above=0)
            clip = float(clip)
        self.noise_multiplier = None if noise_multiplier is None else float(noise_multiplier)
        self.clip = clip
        self.delta = _delta(owner, delta)
        self.target_epsilon = _target(owner, target_epsilon)
        self.accountant = _accountant(owner, accountant)

    @property
    def adaptive(self) -> bool:
        return isinstance(self.clip, AdaptiveClipping)

    @property
    def initial_clip(self) -> float:
        return self.clip.initial if isinstance(self.clip, AdaptiveClipping) else float(self.clip)

    def __repr__(self) -> str:
        return (
            f"DifferentialPrivacy(noise_multiplier={self.noise_multiplier}, clip={self.clip!r}, "
            f"delta={self.delta:g}, target_epsilon={self.target_epsilon}, "
            f"accountant={self.accountant!r})"
        )

    def describe(self) -> dict[str, Any]:
        """The settings as JSON (the report's ``privacy`` section)."""
        clip: Any = self.clip
        if isinstance(clip, AdaptiveClipping):
            clip = {"adaptive": True, **clip.__dict__}
        return {
            "noise_multiplier": self.noise_multiplier,
            "clip": clip,
            "delta": self.delta,
            "target_epsilon": self.target_epsilon,
            "accountant": self.accountant,
        }


class LocalDP:
    """Local DP-SGD on a client through Opacus (Abadi et al., CCS 2016): every optimizer
    step clips each example's gradient to ``max_grad_norm`` and adds Gaussian noise, so
    what the client uploads hides whether any one of its examples was used
    (example-level DP, counted per client, whatever the aggregator does).

    Set it on a client. The LightningModule stays as it is, within what Opacus
    supports: layers Opacus computes per-example gradients for (Linear, Conv, Embedding,
    LayerNorm, GroupNorm, RNNs, ...; BatchNorm is refused because it mixes examples,
    use GroupNorm), one optimizer, automatic optimization, and a loss averaged over the
    batch. The accountant takes ``q = 1 / batches per epoch`` as the sample rate of a
    Poisson-subsampled Gaussian mechanism. Epsilon is logged every round
    (``dp/epsilon``) and sent to the aggregator with the update, which keeps it in
    ``report.json``.

    Args:
        noise_multiplier: the noise's standard deviation over ``max_grad_norm``.
        max_grad_norm: the bound on each example's gradient norm.
        delta: the delta at which epsilon is reported (below 1 / examples).
        target_epsilon: this client stops taking part before a round would spend more.
        accountant: ``"rdp"`` or ``"prv"``.
        poisson_sampling: draw every batch as the accountant assumes: each example
            independently with probability ``q`` (Opacus' ``DPDataLoader`` over the
            train dataloader's dataset, from a generator seeded by ``os.urandom``), so
            batches vary in size around the dataloader's ``batch_size`` (the average
            the noise is divided by) and may rarely be empty. ``False`` keeps the
            dataloader's own shuffled batches of fixed size: the reported epsilon is
            then the common approximation (as Opacus, TF Privacy and Flower report it
            for shuffled batches), not a proven bound. Needs a map-style dataset whose
            items are tensors or tuples of tensors.
    """

    def __init__(
        self,
        noise_multiplier: float,
        max_grad_norm: float = 1.0,
        delta: float = 1e-5,
        target_epsilon: float | None = None,
        accountant: str = "rdp",
        poisson_sampling: bool = True,
    ) -> None:
        owner = "LocalDP"
        if not isinstance(poisson_sampling, bool):
            raise SettingError(
                f"{owner}: poisson_sampling must be True or False, got {poisson_sampling!r}"
            )
        self.poisson_sampling = poisson_sampling
        self.noise_multiplier = check_number(
            f"{owner}: noise_multiplier", noise_multiplier, at_least=0
        )
        self.max_grad_norm = check_number(f"{owner}: max_grad_norm", max_grad_norm, above=0)
        if self.noise_multiplier == 0 and target_epsilon is not None:
            raise SettingError(
                f"{owner}: noise_multiplier=0 spends an infinite epsilon in one step, so "
                f"target_epsilon={target_epsilon!r} can never be kept; hint: give a noise "
                "multiplier > 0 (opacus.accountants.utils.get_noise_multiplier finds one)"
            )
        self.delta = _delta(owner, delta)
        self.target_epsilon = _target(owner, target_epsilon)
        self.accountant = _accountant(owner, accountant)

    def __repr__(self) -> str:
        return (
            f"LocalDP(noise_multiplier={self.noise_multiplier:g}, "
            f"max_grad_norm={self.max_grad_norm:g}, delta={self.delta:g}, "
            f"target_epsilon={self.target_epsilon}, accountant={self.accountant!r}, "
            f"poisson_sampling={self.poisson_sampling})"
        )


#: The extra a distributed-DP client adds to its masked vector under adaptive clipping:
#: whether its update fit the clip, centred (+1/2 or -1/2), plus its share of the
#: count's noise. The secure sum's mean of it, plus 1/2, is the noised fraction.
UNCLIPPED_EXTRA = "dp/unclipped"


@dataclass(frozen=True)
class DistributedNoise:
    """What a round message tells the clients of a distributed-DP round (``dp`` in its
    body): clip the update to ``clip`` and add noise of standard deviation ``std``;
    under adaptive clipping (``count_std > 0``) also send, as the extra
    :data:`UNCLIPPED_EXTRA`, whether the update fit (centred) plus noise of standard
    deviation ``count_std``."""

    clip: float
    std: float
    count_std: float = 0.0

    def to_body(self) -> dict[str, float]:
        out = {"clip": self.clip, "std": self.std}
        if self.count_std:
            out["count_std"] = self.count_std
        return out

    @classmethod
    def parse(cls, body: Any) -> DistributedNoise:
        """Raises ValueError naming what does not fit."""
        rule = (
            "an object with a number 'clip' > 0, a number 'std' >= 0 and optionally a "
            "number 'count_std' >= 0"
        )
        if not isinstance(body, dict):
            raise ValueError(f"the round's differential privacy settings {body!r}: need {rule}")
        values = [body.get("clip"), body.get("std"), body.get("count_std", 0.0)]
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            raise ValueError(f"the round's differential privacy settings {body!r}: need {rule}")
        out = cls(*(float(v) for v in values))
        finite = all(math.isfinite(v) for v in (out.clip, out.std, out.count_std))
        if not (finite and out.clip > 0 and out.std >= 0 and out.count_std >= 0):
            raise ValueError(f"the round's differential privacy settings {body!r}: need {rule}")
        return out
