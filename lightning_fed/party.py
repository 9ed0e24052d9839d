"""Run one party of a federation from a LightningCLI YAML config.

``python -m lightning_fed.party --config aggregator.yaml [--trainer.xxx=...]`` builds
the model, datamodule and Trainer (whose ``strategy`` is a ``FedAvgStrategy``) from
the config, runs ``fit``, and on the aggregator then ``test`` on its holdout data (when
it has a ``test_step`` and test data), whose metrics it sends to the clients; a client
waits for them after its ``fit``. With ``evaluate_on_clients`` every client also tests
the final model on its own test data and the aggregator merges the results.
This is what ``lightning-fed simulate`` starts for every party; in a real deployment
each organisation runs it with its own config (channel on S3, its own node id).
"""

from __future__ import annotations

import itertools
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as L
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.model_helpers import is_overridden

from lightning_fed.errors import LightningFedError, setting_errors
from lightning_fed.fedavg.strategy import FedAvgStrategy
from lightning_fed.hetero import HeteroNNStrategy


def _quiet_known_noise() -> None:
    # Lightning on recent torch warns about its own pytree use on every batch.
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")


def main(argv: Sequence[str] | None = None) -> int:
    """Build the party from its config and run it; returns the exit status."""
    _quiet_known_noise()
    args = list(sys.argv[1:] if argv is None else argv)
    for flag, value in itertools.pairwise(args):
        if flag == "--config":  # the config's folder resolves class_path: module.Class
            sys.path.insert(0, str(Path(value).resolve().parent))
    with setting_errors() as wrong:
        try:
            cli = LightningCLI(
                L.LightningModule,
                L.LightningDataModule,
                subclass_mode_model=True,
                subclass_mode_data=True,
                run=False,
                args=None if argv is None else args,
                save_config_kwargs={"overwrite": True},
            )
        except ValueError as exc:  # a wrong value in the config: one line, not a traceback
            named = [e for e in wrong if str(e) in str(exc)]
            if not named:
                raise
            print(f"lightning-fed party: error in the configuration: {named[0]}", file=sys.stderr)
            return 2
    strategy = cli.trainer.strategy
    if isinstance(strategy, HeteroNNStrategy):
        return _run_hetero(cli, strategy)
    if not isinstance(strategy, FedAvgStrategy):
        raise SystemExit(
            "the config's trainer.strategy must be lightning_fed.FedAvgStrategy or "
            f"lightning_fed.hetero.HeteroNNStrategy, got {type(strategy).__name__}; hint: see "
            "examples/digits/aggregator.yaml or examples/digits_halves/host.yaml"
        )
    try:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        finished = cli.trainer.state.status.value == "finished"
        if strategy.role == "aggregator" and finished:
            if can_test(cli.model, cli.datamodule):
                cli.trainer.test(cli.model, datamodule=cli.datamodule)
            merged = strategy.collect_client_tests()  # None unless evaluate_on_clients
            if merged is not None:
                shown = ", ".join(f"{k}={v:.4f}" for k, v in sorted(merged.items()))
                print(f"aggregator: the clients' test of the final model: {shown}", flush=True)
        elif strategy.left is not None and cli.trainer.is_global_zero:
            print(f"client {strategy.node_id}: left the federation: {strategy.left}", flush=True)
        elif finished and strategy.final_report is not None:
            if strategy.final_report.get("federated_test_expected"):
                if can_test(cli.model, cli.datamodule):  # the aggregator merges the clients'
                    cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
                else:
                    strategy.decline_test()
            report = strategy.receive_test_report()
            for key, what in (
                ("test_metrics", "the global model's test"),
                ("federated_test_metrics", "the clients' test of the global model"),
            ):
                metrics = (report or {}).get(key) or {}
                if metrics and cli.trainer.is_global_zero:  # once per party, not per rank
                    shown = ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()))
                    print(f"client {strategy.node_id}: {what}: {shown}", flush=True)
    except LightningFedError as exc:
        rank = cli.trainer.global_rank
        where = f" (rank {rank})" if rank else ""
        print(f"lightning-fed party {strategy.node_id}{where}: error: {exc}", file=sys.stderr)
        return 1
    return 0


def can_test(model: L.LightningModule, datamodule: L.LightningDataModule | None) -> bool:
    """Whether ``trainer.test`` has something to run: a ``test_step`` and test data.

    An aggregator that holds no data (no datamodule, or one without test data) or a
    model without ``test_step`` skips its test instead of failing after the rounds.
    """
    return is_overridden("test_step", model) and (
        datamodule is not None and is_overridden("test_dataloader", datamodule)
    )


def _run_hetero(cli: LightningCLI, strategy: HeteroNNStrategy) -> int:
    """A HeteroNN party: fit, then test (every party takes part in the host's test)."""
    try:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        if cli.trainer.state.status.value == "finished":
            cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=strategy.role == "host")
    except LightningFedError as exc:
        print(f"lightning-fed party {strategy.node_id}: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
