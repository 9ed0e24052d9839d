"""Differential privacy on the aggregator: one object that clips, noises and counts.

:class:`PrivateRounds` is where DP-FedAvg lives. Central DP: each round's statistic is
a :class:`ClippedMean` (clip every update's change to the global model, sum with
equal weights, add Gaussian noise to the sum, divide by the clients). Distributed DP
(with secure aggregation): the round tells the clients how to clip and how much
noise each adds (:class:`~lightning_fed.privacy.dp_settings.DistributedNoise`), and the
secure sum arrives already noised. Either way, after the round the accountant records
one subsampled Gaussian mechanism and epsilon is reported.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lightning_fed.algorithms import (
    Algorithm,
    ClientUpdate,
    ModelSpec,
    RoundAggregate,
    Statistic,
    TensorSpec,
)
from lightning_fed.fedavg.errors import FedAvgError
from lightning_fed.privacy.accounting import Accountant, noise_multiplier_for
from lightning_fed.privacy.dp import (
    add_noise_,
    clip_,
    next_clip,
    noise_generator,
    update_noise_multiplier,
)
from lightning_fed.privacy.dp_settings import (
    UNCLIPPED_EXTRA,
    AdaptiveClipping,
    DifferentialPrivacy,
    DistributedNoise,
)
from lightning_fed.privacy.settings import SecureAggregation

log = logging.getLogger(__name__)

#: How many noise standard deviations the secure quantisation range must leave room for.
NOISE_ROOM = 4.0


class ClippedMean(Statistic):
    """Central DP's statistic: the equally weighted mean of clipped changes, plus noise.

    Args:
        global_state: the round's global model (the changes are taken against it).
        clip: the bound on each change's L2 norm.
        noise_std: the standard deviation of the noise on the *sum* of the changes.
        count_std: the standard deviation of the noise on the count of unclipped
            updates (adaptive clipping; 0 without it).
        generator: where the noise comes from.
    """

    def __init__(
        self,
        global_state: Mapping[str, torch.Tensor],
        clip: float,
        noise_std: float,
        count_std: float,
        generator: torch.Generator,
    ) -> None:
        super().__init__()
        self.global_state = global_state
        self.clip = clip
        self.noise_std = noise_std
        self.count_std = count_std
        self.generator = generator
        self.unclipped = 0

    def add(self, update: ClientUpdate) -> None:
        change = {
            k: t.to(torch.promote_types(t.dtype, torch.float32)) - self.global_state[k]
            for k, t in update.tensors.items()
        }
        norm = clip_(change, self.clip)
        self.unclipped += int(norm <= self.clip)
        self.model.add(change, 1)
        self.samples += update.num_samples

    def merge(self, other: Statistic) -> None:
        if not isinstance(other, ClippedMean):
            raise TypeError(f"cannot merge {type(other).__name__} into a ClippedMean")
        super().merge(other)
        self.unclipped += other.unclipped

    def result(self) -> RoundAggregate:
        clients = self.model.count
        mean = self.model.compute()  # sum / clients
        add_noise_(mean, self.noise_std / clients, self.generator)
        for k, t in mean.items():  # back in the model's dtype (float16 stays float16)
            base = self.global_state[k]
            mean[k] = t.add_(base.to(t.dtype)).to(base.dtype)
        return RoundAggregate(mean, {}, clients, self.samples)

    def noised_fraction(self) -> float:
        """The fraction of unclipped updates as adaptive clipping sees it, privately:
        ``(sum(b_i - 1/2) + noise) / clients + 1/2`` with ``b_i`` = 1 if client ``i``'s
        update fit. Centring the indicators gives the sum a sensitivity of 1/2, which
        is what :func:`~lightning_fed.privacy.dp.update_noise_multiplier` assumes
        (Andrew et al. 2021; TensorFlow Privacy's quantile estimator does the same)."""
        clients = self.model.count
        noise = torch.randn((), generator=self.generator, dtype=torch.float64).item()
        centred = self.unclipped - clients / 2 + self.count_std * noise
        return centred / max(clients, 1) + 0.5


@dataclass
class RoundPrivacy:
    """What one round spent: logged as ``dp/...`` and kept in the round's history."""

    epsilon: float
    noise_multiplier: float
    sample_rate: float
    clip: float
    unclipped_fraction: float | None = None

    def metrics(self) -> dict[str, float]:
        out = {
            "dp/epsilon": self.epsilon,
            "dp/noise_multiplier": self.noise_multiplier,
            "dp/sample_rate": self.sample_rate,
            "dp/clip": self.clip,
        }
        if self.unclipped_fraction is not None:
            out["dp/unclipped_fraction"] = self.unclipped_fraction
        return out

    def summary(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["epsilon"] = _json_float(self.epsilon)
        return out


class PrivateRounds:
    """DP-FedAvg on the aggregator across rounds: the noise, the clip and the accountant.

    Args:
        settings: the user's :class:`~lightning_fed.privacy.DifferentialPrivacy`.
        secure: the run's secure aggregation (distributed DP), or None (central DP).
        rounds: the planned rounds (to pick the noise for a target epsilon).
    """

    def __init__(
        self,
        settings: DifferentialPrivacy,
        secure: SecureAggregation | None,
        rounds: int,
        ledger: Path | None = None,
    ) -> None:
        self.settings = settings
        self.secure = secure
        self.rounds = rounds
        #: where every round's accounting is written as soon as it is made (recovery)
        self.ledger = ledger
        self.smallest = 1  # the fewest updates a round can be made of (min_clients)
        self.clip = settings.initial_clip
        self.noise_multiplier = settings.noise_multiplier
        self.accountant = Accountant(settings.accountant)
        self.generator = noise_generator()
        self._stat: ClippedMean | None = None  # central DP: the round's statistic
        self._open = False  # a round began and has not been recorded

    @property
    def distributed(self) -> bool:
        return self.secure is not None

    # -- before round 1 ---------------------------------------------------------------------
    def setup(
        self,
        algorithm: Algorithm,
        model: ModelSpec,
        clients: int,
        per_round: int,
        min_clients: int = 1,
    ) -> None:
        """Check the model and the algorithm; pick the noise for a target epsilon.

        Raises:
            FedAvgError: a federated tensor is not floating point, the algorithm uploads
                tensors of its own, adaptive clipping's count noise is too small, or the
                secure quantisation range is too narrow.
        """
        self.smallest = max(1, min(min_clients, per_round))
        ints = sorted(n for n, s in model.tensors.items() if not s.dtype.is_floating_point)
        if ints:
            raise FedAvgError(
                f"differential privacy noises every federated tensor, and {', '.join(ints)} "
                "are not floating point; hint: keep them local, e.g. local_keys="
                "['*num_batches_tracked']"
            )
        if algorithm.upload_spec():
            raise FedAvgError(
                f"differential privacy cannot run {algorithm!r}: its clients upload tensors of "
                f"their own ({', '.join(sorted(algorithm.upload_spec()))}) that would be "
                "neither clipped nor noised; hint: use FedAvg, FedAvgM, FedProx or a server "
                "optimiser (FedAdam, FedYogi, FedAdagrad)"
            )
        rate = per_round / max(clients, 1)
        if self.noise_multiplier is None:
            target = self.settings.target_epsilon
            assert target is not None  # DifferentialPrivacy requires one of the two
            self.noise_multiplier = noise_multiplier_for(
                target, self.settings.delta, rate, self.rounds, self.settings.accountant
            )
            log.info(
                "aggregator: differential privacy: noise multiplier %.4g spends epsilon <= %g "
                "(delta %g) in %d rounds of %d of %d clients",
                self.noise_multiplier,
                target,
                self.settings.delta,
                self.rounds,
                per_round,
                clients,
            )
        if self.noise_multiplier > per_round:
            log.warning(
                "aggregator: differential privacy: noise multiplier %.3g with %d clients per "
                "round puts noise of std %.3g x clip on every coordinate of the mean, more than "
                "any clipped update moves it; expect the model not to learn (client-level DP "
                "needs noise_multiplier / clients per round well below 1: more clients per "
                "round, a larger epsilon, or LocalDP)",
                self.noise_multiplier,
                per_round,
                self.noise_multiplier / per_round,
            )
        if self.noise_multiplier == 0:
            log.warning(
                "aggregator: differential privacy with noise_multiplier=0 clips the updates but "
                "promises no privacy (epsilon is infinite)"
            )
        self._noise(per_round)  # adaptive clipping's count noise must leave the updates some
        if self.secure is not None:
            # The smallest round gives each client the largest share of the noise.
            smallest = max(3, self.smallest)
            std = self.noise_multiplier * self.clip / math.sqrt(smallest)
            room = self.clip + NOISE_ROOM * std
            what = f"a clipped update's coordinate reaches {self.clip:g}"
            if self.adaptive:  # the clip grows; the count's extra must fit too
                count = self._noise(smallest)[1] / math.sqrt(smallest)
                if 0.5 + NOISE_ROOM * count > room:
                    room = 0.5 + NOISE_ROOM * count
                    std, what = count, "the count of unclipped updates reaches 1/2"
            if self.secure.clip < room:
                raise FedAvgError(
                    f"secure aggregation's clip={self.secure.clip:g} is too narrow for "
                    f"distributed DP: {what}, and in a round of {smallest} clients "
                    f"(min_clients) each client's noise has standard deviation {std:.3g}; "
                    f"hint: SecureAggregation(clip={math.ceil(room * 10) / 10:g}) or more"
                )
            if self.adaptive:
                log.warning(
                    "aggregator: adaptive clipping with secure aggregation: the clip may grow "
                    "past secure aggregation's clip=%g per coordinate; coordinates beyond it "
                    "are clipped there (the clients warn when they are)",
                    self.secure.clip,
                )

    # -- each round ---------------------------------------------------------------------------
    def _noise(self, clients: int) -> tuple[float, float]:
        """(the updates' multiplier, the count's stddev) for a round of ``clients``."""
        z = self.noise_multiplier or 0.0
        clip = self.settings.clip
        if not isinstance(clip, AdaptiveClipping):
            return z, 0.0
        count_std = clip.stddev_for(clients)
        try:
            return update_noise_multiplier(z, count_std), count_std
        except ValueError as exc:
            raise FedAvgError(
                f"adaptive clipping with {clients} clients per round: {exc}; hint: "
                f"AdaptiveClipping(count_stddev={math.ceil(z * 0.5 * 1.2 * 100) / 100:g}) or "
                "more, or a smaller noise multiplier"
            ) from None

    def statistic(self, global_state: Mapping[str, torch.Tensor], clients: int) -> Statistic:
        """Central DP: the statistic of a round of ``clients`` clients."""
        z, count_std = self._noise(clients)
        stat = ClippedMean(global_state, self.clip, z * self.clip, count_std, self.generator)
        self._stat, self._open = stat, True
        return stat

    @property
    def adaptive(self) -> bool:
        return isinstance(self.settings.clip, AdaptiveClipping)

    def round_noise(self, clients: int) -> DistributedNoise:
        """Distributed DP: what each of a round's ``clients`` clients clips and adds (its
        share of the updates' noise and, under adaptive clipping, of the count's)."""
        z, count_std = self._noise(clients)
        self._stat, self._open = None, True
        share = 1 / math.sqrt(clients)
        return DistributedNoise(self.clip, z * self.clip * share, count_std * share)

    def secure_extras(self) -> dict[str, TensorSpec]:
        """What distributed DP adds to each masked vector: adaptive clipping's count."""
        if self.distributed and self.adaptive:
            return {UNCLIPPED_EXTRA: TensorSpec((1,), torch.float32)}
        return {}

    def finish_round(
        self,
        chosen: int,
        population: int,
        summed: int,
        extras: dict[str, torch.Tensor] | None = None,
    ) -> RoundPrivacy:
        """Record the round's mechanism; adapt the clip.

        Args:
            chosen: the clients sampled for the round.
            population: the federation's clients.
            summed: the clients whose update is in the sum.
            extras: distributed DP: the secure aggregate's extras; adaptive clipping's
                count (:data:`UNCLIPPED_EXTRA`, the survivors' mean) is taken out of them.
        """
        assert self._open, "finish_round before statistic or round_noise"
        stat, self._stat, self._open = self._stat, None, False
        rate = min(1.0, chosen / max(population, 1))
        clip = self.clip
        fraction = None
        effective = self.noise_multiplier or 0.0
        if self.distributed:
            # Clients that dropped out took their share of the noise with them.
            effective *= math.sqrt(summed / chosen)
        counted = None if extras is None else extras.pop(UNCLIPPED_EXTRA, None)
        if isinstance(self.settings.clip, AdaptiveClipping):
            adaptive = self.settings.clip
            if stat is not None:
                fraction = stat.noised_fraction()
            elif counted is not None:  # the mean of centred, noised indicators
                fraction = float(counted.double().sum()) + 0.5
            if fraction is not None:
                self.clip = next_clip(
                    self.clip, fraction, adaptive.target_quantile, adaptive.learning_rate
                )
        self.accountant.step(effective, rate)
        self._write_ledger()
        return RoundPrivacy(
            self.accountant.epsilon(self.settings.delta), effective, rate, clip, fraction
        )

    def stop_reason(self, chosen: int, population: int) -> str | None:
        """Why the run must stop before another round of ``chosen`` clients (target epsilon)."""
        target = self.settings.target_epsilon
        if target is None:
            return None
        rate = min(1.0, chosen / max(population, 1))
        z = self.noise_multiplier or 0.0
        if self.distributed:  # the worst case: all but min_clients drop out with their noise
            z *= math.sqrt(min(self.smallest, chosen) / max(chosen, 1))
        ahead = self.accountant.epsilon_after(self.settings.delta, z, rate)
        if ahead <= target:
            return None
        return (
            f"target_epsilon={target:g} reached: epsilon is "
            f"{self.accountant.epsilon(self.settings.delta):.4g} and another round would "
            f"spend {ahead:.4g} (delta {self.settings.delta:g})"
        )

    # -- recovery --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "settings": self.settings.describe(),
            "secure": self.distributed,
            "clip": self.clip,
            "noise_multiplier": self.noise_multiplier,
            "accountant": self.accountant.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Carry on from a checkpoint (or the ledger, if it recorded more rounds).

        Raises:
            FedAvgError: the checkpoint was made with other privacy settings.
        """
        mine = {"settings": self.settings.describe(), "secure": self.distributed}
        theirs = {"settings": state.get("settings"), "secure": state.get("secure")}
        if json.loads(json.dumps(mine)) != theirs:
            raise FedAvgError(
                f"the recovery checkpoint was made with differential privacy {theirs}, this "
                f"run has {mine}; hint: restart with the same settings, or give the new run "
                "its own state_dir (the privacy already spent cannot be forgotten)"
            )
        ledger = self._read_ledger()
        if ledger is not None and Accountant.from_state(ledger["accountant"]).steps > (
            Accountant.from_state(dict(state["accountant"])).steps
        ):
            log.warning(
                "aggregator: differential privacy: a round after the last checkpoint was "
                "already released; its privacy is counted (from %s)",
                self.ledger,
            )
            state = ledger
        self.clip = float(state["clip"])
        nm = state.get("noise_multiplier")
        self.noise_multiplier = None if nm is None else float(nm)
        self.accountant = Accountant.from_state(dict(state["accountant"]))

    def _write_ledger(self) -> None:
        if self.ledger is None:
            return
        self.ledger.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.ledger.with_name(self.ledger.name + ".tmp")
        tmp.write_text(json.dumps(self.state_dict()))
        os.replace(tmp, self.ledger)

    def _read_ledger(self) -> dict[str, Any] | None:
        if self.ledger is None or not self.ledger.is_file():
            return None
        try:
            return dict(json.loads(self.ledger.read_text()))
        except (OSError, ValueError) as exc:
            log.warning("aggregator: ignored the privacy ledger %s: %s", self.ledger, exc)
            return None

    def describe(self) -> dict[str, Any]:
        """The report's ``privacy`` section."""
        return {
            "mode": "distributed" if self.distributed else "central",
            **self.settings.describe(),
            "noise_multiplier": self.noise_multiplier,
            "epsilon": _json_float(self.accountant.epsilon(self.settings.delta)),
            "rounds_accounted": self.accountant.steps,
        }


def _json_float(x: float) -> float | None:
    """JSON has no infinity: an infinite epsilon (no noise) is written as null."""
    return None if math.isinf(x) else x
