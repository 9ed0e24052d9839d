"""Secure aggregation in real federations: Trainers in their own processes, real crypto.

The aggregate of a secure round equals plain FedAvg's within the quantisation bound;
clients that drop out before or after masking leave a round that still finishes with
the right sum over the survivors; too many dropouts fail the round naming them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from lightning_fed.privacy import SecureAggregation
from tests.privacy.federations import CLIENTS, FAST, run

pytestmark = pytest.mark.slow


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def close(got: Path, want: Path, bound: float) -> None:
    a, b = weights(got), weights(want)
    assert set(a) == set(b)
    for name, w in b.items():
        err = (a[name].double() - w.double()).abs().max().item()
        assert err <= bound * 1.01 + 1e-7, (name, err, bound)


ALL = {c: 0 for c in [*CLIENTS, "agg"]}
SECURE = SecureAggregation(clip=0.5, bits=20, timeout=120)  # dead clients: found in seconds
BOUND = 0.5 / (2**20 - 1)


def test_the_secure_aggregate_is_plain_fedavgs_within_the_bound_even_without_a_survivor(
    fed: Any,
) -> None:
    """Plain FedAvg, secure aggregation, and secure aggregation where c4 is killed right
    after sending its masked update: all three make the same model (within the bound)."""
    plain = run(fed, "plain", 1, {})
    assert plain.wait() == ALL, plain.log("agg")
    masked = run(
        fed,
        "secure",
        1,
        {"secure_aggregation": SECURE},
        {"secure_aggregation": SecureAggregation()},
    )
    assert masked.wait() == ALL, masked.log("agg") + masked.log("c1")
    close(masked.out("agg") / "final.safetensors", plain.out("agg") / "final.safetensors", BOUND)
    report = masked.report()
    assert report["rounds"][0]["rejected"] == {}
    assert "secure aggregation among c1, c2, c3, c4, c5" in masked.log("agg")
    dropped = run(
        fed,
        "dropped",
        1,
        {"secure_aggregation": SECURE},
        parties={"c4": {"sabotage": [("update", 1, "die_after")]}},
    )
    codes = dropped.wait()
    assert codes == {**ALL, "c4": -9}, dropped.log("agg")
    assert sorted(dropped.report()["rounds"][0]["samples"]) == CLIENTS  # c4's update counts
    close(dropped.out("agg") / "final.safetensors", plain.out("agg") / "final.safetensors", BOUND)


def test_a_client_killed_before_masking_is_left_out_of_the_sum(fed: Any) -> None:
    """c5 is killed after the key exchange, before masking: the round sums c1..c4, as
    plain FedAvg of c1..c4 does; its masks are taken out with its reconstructed key. The
    aggregator learns at once that its process is gone (no calculation_timeout wait)."""
    plain = fed("c1", "c2", "c3", "c4", folder="plain")
    for i, c in enumerate(plain.clients):
        plain.start(c, "client", FAST, {"data_seed": i + 1, "n": 32 + 16 * i})
    plain.start("agg", "aggregator", {**FAST, "rounds": 1})
    assert set(plain.wait().values()) == {0}, plain.log("agg")
    masked = run(
        fed,
        "secure",
        1,
        {"secure_aggregation": SECURE, "min_clients": 3},
        parties={"c5": {"sabotage": [("secagg-check", 1, "die_after")]}},
    )
    codes = masked.wait()
    assert codes == {**ALL, "c5": -9}, masked.log("agg")
    round1 = masked.report()["rounds"][0]
    assert round1["missing"] == ["c5"]
    assert "client c5 is gone (its process (pid" in masked.log("agg")
    assert "no update within" not in masked.log("agg")  # not after calculation_timeout
    close(masked.out("agg") / "final.safetensors", plain.out("agg") / "final.safetensors", BOUND)


def test_too_many_dropouts_fail_the_round_naming_them_and_abort_the_others(fed: Any) -> None:
    """Degree 4, threshold 3: a second neighbour gone after masking leaves 2 shares."""
    secure = SecureAggregation(clip=0.5, bits=20, timeout=120)
    f = run(
        fed,
        "secure",
        2,
        {"secure_aggregation": secure},
        parties={c: {"sabotage": [("update", 1, "die_after")]} for c in ("c4", "c5")},
    )
    codes = f.wait()
    assert codes["agg"] == 1 and codes["c4"] == codes["c5"] == -9
    assert codes["c1"] == codes["c2"] == codes["c3"] == 1
    log = f.log("agg")
    assert "secure aggregation cannot recover the sum: too few correct shares of c1's" in log
    assert "2 of its neighbours answered: c2, c3" in log
    assert "the aggregator 'agg' aborted the federation" in f.log("c1")
    assert not (f.out("agg") / "final.safetensors").exists()


# -- nothing individual leaks ---------------------------------------------------------------
def windows(values: torch.Tensor, width: int, count: int = 12) -> list[bytes]:
    """Byte windows of ``width`` consecutive elements of ``values`` where every element is
    non-zero (a window of zeros could match anything), spread over the tensor."""
    flat = values.reshape(-1)
    if flat.numel() < width:
        return []
    nonzero = (flat != 0).to(torch.int32)
    ok = [i for i in range(flat.numel() - width + 1) if int(nonzero[i : i + width].sum()) == width]
    picked = ok[:: max(1, len(ok) // count)][:count]
    return [flat[i : i + width].contiguous().view(torch.uint8).numpy().tobytes() for i in picked]


def secrets_of(root: Path) -> dict[str, list[bytes]]:
    """Per client: byte windows of its plain updates (weights and changes as float32,
    quantised integers as int64 and in their packed wire form)."""
    from lightning_fed.privacy.quantize import pack

    out: dict[str, list[bytes]] = {}
    for path in sorted((root / "views" / "plain").glob("*.pt")):
        node = path.name.split("-")[0]
        saved = torch.load(path, weights_only=True)
        found = out.setdefault(node, [])
        if "levels" in saved:
            levels = saved["levels"][:-1]
            found += windows(levels, 3)
            bits = SECURE.check_clients(len(CLIENTS))  # the modulus of these rounds
            found += windows(pack(levels, bits), 4 * ((bits + 7) // 8))
            continue
        for name, t in saved.items():
            if name.startswith("d/") or (name.startswith("w/") and t.is_floating_point()):
                d = saved["d/" + name[2:]]
                found += windows(torch.where(d != 0, t.float(), torch.zeros_like(t.float())), 4)
    return out


def haystack(root: Path, agg_out: Path) -> dict[str, bytes]:
    """What the storage operator and the aggregator saw or wrote."""
    views = root / "views"
    files = [*(views / "published").iterdir(), *(views / "received").iterdir()]
    files += [p for p in agg_out.rglob("*") if p.is_file()]
    files.append(root / "agg.log")
    return {str(p): p.read_bytes() for p in files}


def leaks(root: Path, agg_out: Path) -> dict[str, list[str]]:
    seen = haystack(root, agg_out)
    found: dict[str, list[str]] = {}
    for node, wins in secrets_of(root).items():
        assert wins, f"no plain update of {node} was recorded"
        for where, data in seen.items():
            if any(w in data for w in wins):
                found.setdefault(node, []).append(where)
    return found


def test_nothing_individual_reaches_storage_or_the_aggregator(fed: Any) -> None:
    """Scan every stored object and everything the aggregator received and wrote for any
    client's plain update; the same scan finds them in a plain FedAvg run."""
    views = {"record_views": True}
    plain = run(fed, "plain", 2, {}, parties={c: views for c in CLIENTS})
    assert plain.wait() == ALL, plain.log("agg")
    # The control: in plain FedAvg the storage and the aggregator hold every update.
    assert sorted(leaks(plain.root, plain.out("agg"))) == CLIENTS
    masked = run(
        fed, "secure", 2, {"secure_aggregation": SECURE}, parties={c: views for c in CLIENTS}
    )
    assert masked.wait() == ALL, masked.log("agg")
    assert leaks(masked.root, masked.out("agg")) == {}
    # ...though the scan would find the quantised integers if they were there.
    secret = secrets_of(masked.root)["c1"]
    levels = [p for p in (masked.root / "views" / "plain").glob("c1-levels-*")]
    assert levels and any(w in levels[0].read_bytes() for w in secret)


# -- misbehaving clients ---------------------------------------------------------------------
def test_a_malformed_share_or_masked_vector_is_named_and_its_sender_left_out(fed: Any) -> None:
    """c3's shares do not open (random bytes of the right length); c2's masked vector is
    one element short: both are named in the round's report and left out, and the round
    sums the other three."""
    f = run(
        fed,
        "secure",
        1,
        {"secure_aggregation": SECURE, "min_clients": 3},
        parties={
            "c3": {"sabotage": [("secagg-shares", 1, "garble")]},
            "c2": {"sabotage": [("update", 1, "short")]},
        },
    )
    assert f.wait() == ALL, f.log("agg")
    round1 = f.report()["rounds"][0]
    assert sorted(round1["samples"]) == ["c1", "c4", "c5"]
    assert "left out of secure aggregation" in round1["rejected"]["c3"]
    assert "does not open with the agreed key" in round1["rejected"]["c3"]
    assert "masked" in round1["rejected"]["c2"] and "shape" in round1["rejected"]["c2"]
    assert "left out of this round's secure aggregation" in f.log("c3")


def test_secure_aggregation_over_s3(fed: Any, s3_endpoint: str) -> None:
    from lightning_fed.testing import make_bucket, s3_storage_options

    url = f"s3://{make_bucket(s3_endpoint)}/federation"
    s3 = {"storage_options": s3_storage_options(s3_endpoint)}
    f = fed(*CLIENTS, folder="s3")
    for i, c in enumerate(CLIENTS):
        f.start(c, "client", {**FAST, **s3}, {"data_seed": i + 1, "n": 32 + 16 * i, "url": url})
    f.start(
        "agg", "aggregator", {**FAST, **s3, "rounds": 2, "secure_aggregation": SECURE}, {"url": url}
    )
    assert f.wait() == ALL, f.log("agg")
    assert [sorted(r["samples"]) for r in f.report()["rounds"]] == [CLIENTS, CLIENTS]
    assert "secure aggregation among c1, c2, c3, c4, c5" in f.log("agg")


def test_a_server_optimiser_steps_on_the_securely_aggregated_mean(fed: Any) -> None:
    """FedAdam on the secure mean makes the model FedAdam makes on the plain mean (its
    first step amplifies the quantisation error by at most lr (1 - beta1) / tau)."""
    from lightning_fed.algorithms import FedAdam

    plain = run(fed, "plain", 2, {"algorithm": FedAdam(lr=0.05)})
    assert plain.wait() == ALL, plain.log("agg")
    masked = run(fed, "secure", 2, {"algorithm": FedAdam(lr=0.05), "secure_aggregation": SECURE})
    assert masked.wait() == ALL, masked.log("agg")
    close(masked.out("agg") / "final.safetensors", plain.out("agg") / "final.safetensors", 1e-4)
    assert "algorithm FedAdam(" in masked.log("c1")


def test_federated_evaluation_works_beside_secure_aggregation(fed: Any) -> None:
    """The clients' validation of the global model travels beside the masked update and
    still merges exactly (an aggregator without data)."""
    from tests.fedavg.test_evaluation import TEST, VAL, _pooled

    f = fed("c1", "c2", "c3", folder="evaluated")
    for i, c in enumerate(f.clients):
        party = {"data_seed": i + 1, "model": "metrics", "val": VAL[c], "test": TEST[c]}
        f.start(c, "client", FAST, party)
    agg = {**FAST, "rounds": 2, "evaluate_on_clients": True, "secure_aggregation": SECURE}
    f.start("agg", "aggregator", agg, {"model": "metrics", "no_data": True})
    assert f.wait() == {"c1": 0, "c2": 0, "c3": 0, "agg": 0}, f.log("agg") + f.log("c1")
    report = f.report()
    pooled = _pooled(load_file(str(f.out("agg") / "final.safetensors")))
    assert report["final_federated_metrics"]["val_auroc"] == pytest.approx(
        pooled["auroc"], abs=1e-6
    )
    assert "federated_metrics" in report["rounds"][0]
    assert "secure aggregation among c1, c2, c3" in f.log("agg")


def test_an_aggregator_that_swaps_a_client_s_keys_gets_no_shares(fed: Any) -> None:
    """The aggregator (sabotaged: in the middle) gives c1's advert a key of its own in
    the roster, keeping c1's signature, so that the shares sealed to c1 would open with
    its key. Every client checks each advert's signature against the task's node keys,
    names c1's keys as changed and shares nothing; the run fails on every side."""
    f = run(
        fed,
        "mitm",
        1,
        {"secure_aggregation": SECURE},
        agg_party={"sabotage": [("secagg-roster", 1, "swap_keys")]},
    )
    assert f.wait() == {n: 1 for n in [*CLIENTS, "agg"]}
    assert "client 'c1' is not in the aggregator's roster with its own keys" in f.log("c1")
    for c in CLIENTS[1:]:
        assert f"client '{c}': the roster's keys of c1 do not carry their node's" in f.log(c)
    assert "0 client(s) got through the key exchange" in f.log("agg")
