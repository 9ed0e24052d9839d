"""Channel benchmark: message round-trip latency and tensor throughput.

Prints, for file:// and for a local S3 endpoint (moto server on 127.0.0.1):

- ping-pong round trip between two processes (median and p95, ms);
- a 100 MB state_dict sent and received through the channel, as a throughput
  ratio to plain ``safetensors.torch.save_file`` + ``load_file`` of the same
  dict on the same disk (1.0 = as fast as the baseline; the target is >= 0.5).

Run: ``make bench`` or ``.venv/bin/python benchmarks/channel.py [--rounds 200]``.
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing as mp
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lightning_fed.channel import Channel, NodeIdentity, TaskConfig
from lightning_fed.channel.tensors import encode_tensors
from lightning_fed.testing import local_s3, make_bucket, s3_storage_options

TASK = "bench"


def _open(url: str, opts: dict[str, Any], keydir: str, node: str) -> Channel:
    task = TaskConfig.load(Path(keydir) / "task.json")
    me = NodeIdentity.load(Path(keydir) / f"{node}.key")
    return Channel(url, task, me, storage_options=opts).connect()


def _responder(url: str, opts: dict[str, Any], keydir: str, rounds: int) -> None:
    ch = _open(url, opts, keydir, "pong")
    for _ in range(rounds):
        msg = ch.receive("ping", sender="ping", timeout=120)
        ch.send("pong", msg.body, to="ping", round=msg.round)


def ping_pong(url: str, opts: dict[str, Any], keydir: str, rounds: int) -> list[float]:
    """Round-trip times in ms of ``rounds`` ping-pongs with a responder process."""
    proc = mp.get_context("spawn").Process(target=_responder, args=(url, opts, keydir, rounds + 5))
    proc.start()
    ch = _open(url, opts, keydir, "ping")
    times = []
    try:
        for r in range(rounds + 5):
            t0 = time.perf_counter()
            ch.send("ping", {"r": r}, to="pong", round=r)
            ch.receive("pong", sender="pong", round=r, timeout=120)
            if r >= 5:  # the first few warm up both processes
                times.append((time.perf_counter() - t0) * 1e3)
    finally:
        proc.join(60)
    return times


def state_dict_100mb() -> dict[str, torch.Tensor]:
    """About 100 MB of float32 tensors shaped like a model's layers."""
    g = torch.Generator().manual_seed(0)
    sd = {f"layer{i}.weight": torch.randn(1024, 1024, generator=g) for i in range(24)}
    sd.update({f"layer{i}.bias": torch.randn(1024, generator=g) for i in range(24)})
    return sd


def baseline_seconds(sd: dict[str, torch.Tensor], directory: Path) -> float:
    """Plain safetensors save_file + load_file of ``sd`` on ``directory``'s disk."""
    path = directory / "baseline.safetensors"
    t0 = time.perf_counter()
    save_file(sd, path)
    loaded = load_file(path)
    elapsed = time.perf_counter() - t0
    assert loaded.keys() == sd.keys()
    path.unlink()
    return elapsed


def baseline_touched_seconds(sd: dict[str, torch.Tensor], directory: Path) -> float:
    """As :func:`baseline_seconds`, then copy every loaded tensor into a model-like dict.

    ``load_file`` maps the file lazily, so the plain baseline never reads the data;
    a receiver always does (``load_state_dict`` copies it). This baseline includes that.
    """
    path = directory / "baseline.safetensors"
    target = {k: torch.empty_like(v) for k, v in sd.items()}
    t0 = time.perf_counter()
    save_file(sd, path)
    for k, v in load_file(path).items():
        target[k].copy_(v)
    elapsed = time.perf_counter() - t0
    path.unlink()
    return elapsed


def sha256_seconds(sd: dict[str, torch.Tensor]) -> float:
    """One SHA-256 pass over the tensors' bytes: the channel needs two (send, verify)."""
    chunks = encode_tensors(sd).chunks
    t0 = time.perf_counter()
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    h.hexdigest()
    return time.perf_counter() - t0


def channel_seconds(
    sd: dict[str, torch.Tensor], url: str, opts: dict[str, Any], keydir: str, touch: bool = False
) -> float:
    """Send ``sd`` through the channel and receive it (verify, decode), in seconds."""
    sender, receiver = _open(url, opts, keydir, "ping"), _open(url, opts, keydir, "pong")
    target = {k: torch.empty_like(v) for k, v in sd.items()}
    t0 = time.perf_counter()
    sender.send("weights", {}, to="pong", tensors=sd)
    msg = receiver.receive("weights", sender="ping", timeout=600)
    if touch:
        for k, v in msg.tensors.items():
            target[k].copy_(v)
    elapsed = time.perf_counter() - t0
    assert msg.tensors.keys() == sd.keys()
    sender.prune_sent()
    return elapsed


def run(
    label: str, url: str, opts: dict[str, Any], keydir: str, disk: Path, args: argparse.Namespace
) -> None:
    rtt = ping_pong(url, opts, keydir, args.rounds)
    q = statistics.quantiles(rtt, n=20)
    print(
        f"[{label}] ping-pong round trip over {len(rtt)} rounds: "
        f"median {statistics.median(rtt):.1f} ms, p95 {q[18]:.1f} ms (target: median <= 20 ms)"
    )
    sd = state_dict_100mb()
    mb = sum(t.numel() * t.element_size() for t in sd.values()) / 1e6
    base = [baseline_seconds(sd, disk) for _ in range(args.repeats)]
    chan = [channel_seconds(sd, url, opts, keydir) for _ in range(args.repeats)]
    b, c = statistics.median(base), statistics.median(chan)
    print(
        f"[{label}] {mb:.0f} MB state_dict: channel send+receive {c:.3f} s ({mb / c:.0f} MB/s), "
        f"safetensors save_file+load_file {b:.3f} s ({mb / b:.0f} MB/s); "
        f"throughput ratio {b / c:.2f} (target >= 0.5)"
    )
    bt = statistics.median([baseline_touched_seconds(sd, disk) for _ in range(args.repeats)])
    ct = statistics.median(
        [channel_seconds(sd, url, opts, keydir, True) for _ in range(args.repeats)]
    )
    print(
        f"[{label}] same, each side then copying the tensors into a model's buffers: channel "
        f"{ct:.3f} s, safetensors {bt:.3f} s; throughput ratio {bt / ct:.2f}"
    )
    if label.startswith("file"):
        h = statistics.median([sha256_seconds(sd) for _ in range(args.repeats)])
        print(
            f"[{label}] for scale: one SHA-256 pass over {mb:.0f} MB takes {h:.3f} s here; the "
            "channel makes two (sender signs the digest, receiver verifies it)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=200, help="ping-pong round trips")
    parser.add_argument("--repeats", type=int, default=5, help="repeats of the 100 MB transfer")
    parser.add_argument(
        "--dir", default=None, help="directory on the disk to measure (default: a temp dir)"
    )
    parser.add_argument("--skip-s3", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        keydir = root / "keys"
        publics = [NodeIdentity.generate(n).save(keydir)[1] for n in ("ping", "pong")]
        TaskConfig.from_public_key_files(TASK, publics).save(keydir / "task.json")  # type: ignore[arg-type]
        print(f"lightning_fed channel benchmark (torch {torch.__version__}, disk: {root})")
        run("file://", (root / "fed").as_uri(), {}, str(keydir), root, args)
        if not args.skip_s3:
            with local_s3() as endpoint:
                opts = s3_storage_options(endpoint)
                run(
                    "s3:// (moto on 127.0.0.1)",
                    f"s3://{make_bucket(endpoint)}/fed",
                    opts,
                    str(keydir),
                    root,
                    args,
                )


if __name__ == "__main__":
    main()
