"""ECDH private set intersection: the maths, and two real parties in real processes."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from lightning_fed.hetero.psi import InvalidPointError, PsiKey, encode_id, hash_ids
from lightning_fed.hetero.psi.ecdh import check_unique, members, point_set
from lightning_fed.simulate import make_keys
from tests.hetero.psi import parties
from tests.processes import CTX

# -- the maths -------------------------------------------------------------------------


def test_ids_encode_canonically_and_reject_other_types() -> None:
    assert encode_id("7") == encode_id(7) == encode_id(b"7") == b"7"
    assert encode_id("é") == "é".encode()
    for bad in (True, 1.5, None, ("a",)):
        with pytest.raises(TypeError, match="an ID must be a str, an int or bytes"):
            encode_id(bad)  # type: ignore[arg-type]


def test_hashing_is_deterministic_and_separated_by_context() -> None:
    a = hash_ids(["x", "y"], b"task-1")
    assert a.shape == (2, 32) and a.dtype == np.uint8
    assert np.array_equal(a, hash_ids(["x", "y"], b"task-1"))
    assert not np.array_equal(a[0], a[1])
    assert not np.array_equal(a, hash_ids(["x", "y"], b"task-2"))
    assert hash_ids([], b"t").shape == (0, 32)


def test_blinding_commutes_and_hides_the_point() -> None:
    points = hash_ids(range(300), b"t")
    a, b = PsiKey.generate(), PsiKey.generate()
    ab, ba = b.blind(a.blind(points)), a.blind(b.blind(points))
    assert np.array_equal(ab, ba)
    assert not np.array_equal(a.blind(points), points)
    assert not np.array_equal(a.blind(points), b.blind(points))
    assert np.array_equal(a.blind(points, workers=2), a.blind(points))  # a pool agrees
    assert "secret" in repr(a) and repr(a).count("PsiKey") == 1


def test_blinding_many_points_with_a_pool_matches_one_process() -> None:
    points = hash_ids(range(45_000), b"t")  # more than two chunks of work
    key = PsiKey.generate()
    assert np.array_equal(key.blind(points, workers=2), key.blind(points))


def test_low_order_and_malformed_points_are_refused() -> None:
    key = PsiKey.generate()
    zero = np.zeros((3, 32), dtype=np.uint8)  # u = 0 is of low order
    with pytest.raises(InvalidPointError, match="low order"):
        key.blind(zero)
    for bad in (np.zeros((3, 31), np.uint8), np.zeros((3, 32), np.int16), np.zeros(32, np.uint8)):
        with pytest.raises(InvalidPointError, match=r"expected an \(n, 32\) uint8 array"):
            key.blind(bad)


def test_membership_helpers_and_duplicates() -> None:
    points = hash_ids(["a", "b", "c"], b"t")
    assert members(points, point_set(points[1:])).tolist() == [False, True, True]
    check_unique(["a", "b", 1])
    with pytest.raises(ValueError, match=r"ID 7 appears more than once.*'7' are the same"):
        check_unique(["7", 7])


# -- two real parties ---------------------------------------------------------------------


class Pair:
    """Two PSI parties as processes over one storage, with their results."""

    def __init__(self, root: Path) -> None:
        self.root = root
        make_keys(root, "psi-task", ["host", "guest"])
        self.procs: list[Any] = []

    def start(self, node: str, peer: str, ids: list[Any], **opts: Any) -> None:
        p = CTX.Process(target=parties.run, args=(str(self.root), node, peer, ids, opts))
        p.start()
        self.procs.append(p)

    def results(self, timeout: float = 180) -> dict[str, dict[str, Any]]:
        deadline = time.monotonic() + timeout
        for p in self.procs:
            p.join(max(0.1, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
        return {
            node: json.loads((self.root / f"{node}.json").read_text())
            for node in ("host", "guest")
            if (self.root / f"{node}.json").exists()
        }

    def stored_bytes(self) -> bytes:
        return b"".join(p.read_bytes() for p in (self.root / "channel").rglob("*") if p.is_file())


def test_two_parties_learn_the_same_intersection_and_nothing_in_the_clear(
    tmp_path: Path,
) -> None:
    host_ids = [f"patient-{i}" for i in range(0, 900)]
    guest_ids = [f"patient-{i}" for i in range(600, 1500)][::-1]  # another order
    pair = Pair(tmp_path)
    pair.start("host", "guest", host_ids)
    pair.start("guest", "host", guest_ids)
    got = pair.results()
    want = {f"patient-{i}" for i in range(600, 900)}
    assert set(got["host"]["ids"]) == set(got["guest"]["ids"]) == want
    assert got["host"]["ids"] == [i for i in host_ids if i in want]  # the caller's order
    assert got["guest"]["ids"] == [i for i in guest_ids if i in want]
    assert got["host"]["peer_sizes"] == {"guest": 900}
    assert got["guest"]["peer_sizes"] == {"host": 900}
    # Nothing stored in the channel holds an ID or a plain hash of one.
    stored = pair.stored_bytes()
    assert len(stored) > 4 * 900 * 32  # the four lists of points are still there
    for i in range(0, 1500, 7):
        assert f"patient-{i}".encode() not in stored
    for row in hash_ids(host_ids + guest_ids, b"psi-task"):
        assert row.tobytes() not in stored


def test_integer_ids_and_an_empty_intersection(tmp_path: Path) -> None:
    pair = Pair(tmp_path)
    pair.start("host", "guest", list(range(0, 50)))
    pair.start("guest", "host", list(range(50, 80)))
    got = pair.results()
    assert got["host"]["ids"] == [] and got["guest"]["ids"] == []
    assert got["host"]["peer_sizes"] == {"guest": 30}
    assert got["guest"]["peer_sizes"] == {"host": 50}


def test_a_leftover_message_of_an_earlier_run_is_not_mixed_in(tmp_path: Path) -> None:
    pair = Pair(tmp_path)
    with parties.channel(str(tmp_path), "guest") as stale:  # a guest that crashed before
        points = PsiKey.generate().blind(hash_ids(range(1000, 1400), b"psi-task"))
        stale.send(
            "psi-blinded", {"nonce": "old"}, to="host", tensors={"points": torch.from_numpy(points)}
        )
    pair.start("host", "guest", list(range(0, 100)))
    pair.start("guest", "host", list(range(50, 150)))
    got = pair.results()
    assert got["host"]["ids"] == list(range(50, 100)) == got["guest"]["ids"]


def test_a_peer_that_never_comes_is_a_clear_error_within_the_timeout(tmp_path: Path) -> None:
    pair = Pair(tmp_path)
    started = time.monotonic()
    pair.start("host", "guest", list(range(10)), timeout=3)
    got = pair.results()
    assert time.monotonic() - started < 60
    assert "no answer from 'guest' within timeout=3 s" in got["host"]["error"]
    assert "start the intersection on 'guest' too" in got["host"]["error"]


def test_forged_points_from_the_peer_stop_the_intersection(tmp_path: Path) -> None:
    pair = Pair(tmp_path)
    with parties.channel(str(tmp_path), "guest") as forger:
        zeros = torch.zeros((20, 32), dtype=torch.uint8)
        forger.send("psi-blinded", {"nonce": "n"}, to="host", tensors={"points": zeros})
    pair.start("host", "guest", list(range(10)), timeout=30)
    got = pair.results()
    assert "the intersection with 'guest' failed" in got["host"]["error"]
    assert "low order" in got["host"]["error"]


def test_over_s3(tmp_path: Path, s3_endpoint: str) -> None:
    from lightning_fed.testing import make_bucket, s3_storage_options

    url = f"s3://{make_bucket(s3_endpoint)}/psi"
    opts = {"url": url, "options": s3_storage_options(s3_endpoint)}
    pair = Pair(tmp_path)
    pair.start("host", "guest", list(range(0, 300)), **opts)
    pair.start("guest", "host", list(range(200, 400)), **opts)
    got = pair.results()
    assert got["host"]["ids"] == list(range(200, 300)) == got["guest"]["ids"]


# -- a host and several collaborators ------------------------------------------------------


def run_group(root: Path, sets: dict[str, list[Any]], timeout: float = 120) -> dict[str, Any]:
    """Run private_intersection on every party of ``sets`` (the first is the host)."""
    nodes = list(sets)
    if not (root / "keys" / "task.json").exists():
        make_keys(root, "psi-task", nodes)
    procs = []
    for node in nodes:
        collaborators = nodes[1:] if node == nodes[0] else None
        args = (str(root), node, nodes[0], collaborators, sets[node], timeout)
        p = CTX.Process(target=parties.run_align, args=args)
        p.start()
        procs.append(p)
    for p in procs:
        p.join(timeout + 60)
        if p.is_alive():
            p.kill()
    return {n: json.loads((root / f"{n}.json").read_text()) for n in nodes}


@pytest.mark.parametrize("collaborators", [2, 3])
def test_every_party_learns_only_the_intersection_of_all(
    tmp_path: Path, collaborators: int
) -> None:
    sets = {"host": [f"patient-{i:05d}" for i in range(0, 400)]}
    for j in range(collaborators):  # overlapping ranges: pairwise overlaps exceed the common part
        sets[f"c{j + 1}"] = [f"patient-{i:05d}" for i in range(50 * (j + 1), 400 + 50 * (j + 1))][
            ::-1
        ]
    got = run_group(tmp_path, sets)
    common = set.intersection(*(set(v) for v in sets.values()))
    assert len(common) == 400 - 50 * collaborators
    for node, ids in sets.items():
        assert "error" not in got[node], got[node]
        assert got[node]["ids"] == [i for i in ids if i in common]  # its own order
        others = {n: len(v) for n, v in sets.items() if n != node}
        assert got[node]["peer_sizes"] == others
    # Pairwise intersections are larger than the common part; nobody got one.
    assert len(set(sets["host"]) & set(sets["c1"])) > len(common)
    stored = b"".join(p.read_bytes() for p in (tmp_path / "channel").rglob("*") if p.is_file())
    everything = sorted(set().union(*sets.values()))
    for i in everything[::5]:
        assert i.encode() not in stored
    for row in hash_ids(everything, b"psi-task"):
        assert row.tobytes() not in stored


def test_two_parties_through_the_handshake_and_a_stale_start_ignored(tmp_path: Path) -> None:
    make_keys(tmp_path, "psi-task", ["host", "c1"])
    with parties.channel(str(tmp_path), "host") as old:  # a host that crashed before
        old.send("psi-start", {"session": "old", "parties": ["host", "c1"]}, to="c1")
    got = run_group(tmp_path, {"host": list(range(100)), "c1": list(range(60, 160))})
    assert got["host"]["ids"] == list(range(60, 100)) == got["c1"]["ids"]


def test_a_collaborator_that_never_joins_is_named(tmp_path: Path) -> None:
    make_keys(tmp_path, "psi-task", ["host", "c1", "c2"])
    p = CTX.Process(
        target=parties.run_align, args=(str(tmp_path), "host", "host", ["c1", "c2"], [1, 2], 3)
    )
    q = CTX.Process(target=parties.run_align, args=(str(tmp_path), "c1", "host", None, [1], 3))
    p.start()
    q.start()
    p.join(60)
    q.join(60)
    error = json.loads((tmp_path / "host.json").read_text())["error"]
    assert "c2 did not join the intersection within 3 s" in error
    assert "start it there with host='host'" in error
