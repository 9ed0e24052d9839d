"""PSI figures: time and bytes of the two-party ECDH intersection, host + 1 collaborator.

    .venv/bin/python benchmarks/psi.py                 # 1e4, 1e5 and 1e6 IDs per party
    .venv/bin/python benchmarks/psi.py --sizes 10000

Each party is its own process over a local-folder channel, with half of its IDs
shared with the other's. The baseline is what the parties would do if they could
share their IDs in the clear: a Python set intersection, timed in the same script.
Target (issue 4): 1e6 x 1e6 in <= 90 s on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _party(root: str, node: str, peer: str, lo: int, hi: int, workers: int) -> None:
    from lightning_fed.channel import Channel, NodeIdentity, TaskConfig
    from lightning_fed.psi import intersect

    keys = Path(root) / "keys"
    task = TaskConfig.load(keys / "task.json")
    me = NodeIdentity.load(keys / f"{node}.key", node)
    ids = [f"id-{i:09d}" for i in range(lo, hi)]
    with Channel(str(Path(root) / "channel"), task, me) as ch:
        res = intersect(ch, peer, ids, timeout=1800, workers=workers)
    summary = {
        "found": len(res.ids),
        "seconds": res.seconds,
        "sent": res.bytes_sent,
        "received": res.bytes_received,
    }
    (Path(root) / f"{node}.json").write_text(json.dumps(summary))


def run(n: int, workers: int) -> None:
    from lightning_fed.simulate import make_keys

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_keys(root, "psi-bench", ["host", "collaborator"])
        ctx = mp.get_context("spawn")
        procs = [
            ctx.Process(target=_party, args=(tmp, "host", "collaborator", 0, n, workers)),
            ctx.Process(
                target=_party, args=(tmp, "collaborator", "host", n // 2, n + n // 2, workers)
            ),
        ]
        started = time.monotonic()
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        wall = time.monotonic() - started
        if any(p.exitcode for p in procs):
            raise SystemExit(f"a party failed for n={n}")
        host = json.loads((root / "host.json").read_text())
        collab = json.loads((root / "collaborator.json").read_text())
    assert host["found"] == collab["found"] == n - n // 2, (host, collab)
    a = [f"id-{i:09d}" for i in range(0, n)]
    b = [f"id-{i:09d}" for i in range(n // 2, n + n // 2)]
    t = time.perf_counter()
    plain = set(a) & set(b)
    baseline = time.perf_counter() - t
    assert len(plain) == host["found"]
    seconds = max(host["seconds"], collab["seconds"])
    moved = host["sent"] + collab["sent"]
    print(
        f"PSI {n:>9,} x {n:,} IDs ({host['found']:,} shared): {seconds:7.2f} s "
        f"(wall with process start {wall:.2f} s), {moved / 1e6:8.1f} MB of points sent "
        f"({moved / n:.0f} B per ID); plaintext set intersection {baseline:.3f} s, "
        f"ratio {seconds / baseline:,.0f}x" + ("  (target <= 90 s)" if n == 1_000_000 else ""),
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--workers", type=int, default=1, help="blinding processes per party")
    args = parser.parse_args()
    for n in args.sizes:
        run(n, args.workers)


if __name__ == "__main__":
    main()
