"""The MNIST examples' torchvision data path: ``torchvision.datasets.MNIST`` over IDX files
laid out as torchvision expects, its transforms, and a real federation trained on it.

The data is made here: scikit-learn's 1,797 real 8x8 digits scaled up to 28x28 and
written as MNIST's IDX files (the test split, and a training split where a test needs
one), so the tests need neither the network nor ``../shared``.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "examples" / "mnist"), str(ROOT / "examples" / "mnist_halves")]

from mnist import MnistData, layout_for_torchvision, mnist_tensors  # noqa: E402
from mnist_halves import _images  # noqa: E402

from tests.test_simulate import simulate_command  # noqa: E402

pytestmark = [pytest.mark.vision, pytest.mark.timeout(300)]


def digits_28() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's real digits as (N, 28, 28) uint8 images and uint8 labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    big = F.interpolate(small, size=(20, 20), mode="bilinear", align_corners=False)
    big = F.pad(big, (4, 4, 4, 4))  # MNIST centres a 20x20 digit in 28x28
    images = (big.squeeze(1).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    return images, digits.target.astype(np.uint8)


def write_idx(path: Path, array: np.ndarray) -> None:
    """An unsigned-byte IDX file, gzipped: MNIST's format."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    with gzip.open(path, "wb") as fh:
        fh.write(header + np.ascontiguousarray(array).tobytes())


def idx_folder(folder: Path, train: int = 0) -> Path:
    """Gzipped IDX files of the digits: the last images as t10k, ``train`` first as train."""
    images, labels = digits_28()
    folder.mkdir(parents=True, exist_ok=True)
    write_idx(folder / "t10k-images-idx3-ubyte.gz", images[train:])
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", labels[train:])
    if train:
        write_idx(folder / "train-images-idx3-ubyte.gz", images[:train])
        write_idx(folder / "train-labels-idx1-ubyte.gz", labels[:train])
    return folder


@pytest.fixture(scope="module")
def test_split(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the gzipped IDX folder, the same files laid out for torchvision): test split only."""
    base = tmp_path_factory.mktemp("digits")
    idx = idx_folder(base / "idx")
    return idx, layout_for_torchvision(base / "torchvision", idx)


def test_the_layout_is_torchvisions_own(test_split: tuple[Path, Path]) -> None:
    from torchvision import datasets

    _, vision = test_split
    raw = vision / "MNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == [
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ]
    # torchvision's own MNIST refuses a folder without the training split...
    with pytest.raises(RuntimeError, match="Dataset not found"):
        datasets.MNIST(str(vision), train=False)
    # ...so the example's reader needs only the split it reads, from the same place.
    data = MnistData(source="torchvision", root=str(vision), train_pool=1500)
    data.setup("fit")
    assert len(data.holdout) == 1797 - 1500


@pytest.mark.parametrize("alpha", [None, 0.1], ids=["iid", "dirichlet"])
def test_torchvision_and_the_idx_reader_give_the_same_parties_data(
    test_split: tuple[Path, Path], alpha: float | None
) -> None:
    idx, vision = test_split
    for client in (0, 1, None):
        args = dict(client_index=client, num_clients=2, train_pool=1500, dirichlet_alpha=alpha)
        mine = MnistData(source="idx", root=str(idx), **args)  # type: ignore[arg-type]
        theirs = MnistData(source="torchvision", root=str(vision), **args)  # type: ignore[arg-type]
        mine.setup("fit")
        theirs.setup("fit")
        for a, b in ((mine.train, theirs.train), (mine.holdout, theirs.holdout)):
            assert len(a) == len(b) > 0
            xa = torch.stack([a[i][0] for i in range(len(a))])
            xb = torch.stack([torch.as_tensor(b[i][0]) for i in range(len(b))])
            assert torch.allclose(xa, xb, atol=1e-5)
            assert [int(a[i][1]) for i in range(len(a))] == [int(b[i][1]) for i in range(len(b))]


def test_augmentation_moves_training_images_only(test_split: tuple[Path, Path]) -> None:
    _, vision = test_split
    plain = MnistData(client_index=0, source="torchvision", root=str(vision), train_pool=1500)
    augmented = MnistData(
        client_index=0, source="torchvision", root=str(vision), train_pool=1500, augment=True
    )
    plain.setup("fit")
    augmented.setup("fit")
    torch.manual_seed(0)
    moved = sum(not torch.allclose(plain.train[i][0], augmented.train[i][0]) for i in range(50))
    assert moved > 40  # a random rotation and shift leaves almost no image as it was
    assert all(torch.equal(plain.holdout[i][0], augmented.holdout[i][0]) for i in range(50))


def test_a_training_split_is_shared_by_the_clients_and_the_test_split_held_out(
    tmp_path: Path,
) -> None:
    vision = layout_for_torchvision(tmp_path / "torchvision", idx_folder(tmp_path / "idx", 1200))
    shares = []
    for client in (0, 1):
        data = MnistData(client_index=client, source="torchvision", root=str(vision))
        data.setup("fit")
        shares.append(len(data.train))
    assert sum(shares) == 1200  # the whole training split, as with the real 60,000
    holdout = MnistData(source="torchvision", root=str(vision))
    holdout.setup("fit")
    assert len(holdout.holdout) == 1797 - 1200


def test_missing_files_and_wrong_options_say_what_to_do(tmp_path: Path) -> None:
    data = MnistData(source="torchvision", root=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"python examples/mnist/mnist.py"):
        data.setup("fit")
    with pytest.raises(ValueError, match="augment and download need source='torchvision'"):
        MnistData(source="idx", augment=True)
    with pytest.raises(FileNotFoundError, match=r"no MNIST IDX file"):
        layout_for_torchvision(tmp_path / "out", tmp_path)


def test_the_halves_read_both_splits_through_torchvision(tmp_path: Path) -> None:
    idx = idx_folder(tmp_path / "idx", 1200)
    vision = layout_for_torchvision(tmp_path / "torchvision", idx)
    x, y = _images("torchvision", str(vision))
    train = mnist_tensors(idx, "train")
    test = mnist_tensors(idx)
    assert type(x) is torch.Tensor  # no torchvision wrapper reaches the models
    assert torch.allclose(x, torch.cat([train.tensors[0], test.tensors[0]]), atol=1e-5)
    assert torch.equal(y, torch.cat([train.tensors[1], test.tensors[1]]))
    only_test = layout_for_torchvision(tmp_path / "test-only", idx_folder(tmp_path / "t"))
    with pytest.raises(FileNotFoundError, match="use source: idx offline"):
        _images("torchvision", str(only_test))


def test_a_federation_trains_on_torchvisions_mnist(tmp_path: Path) -> None:
    """The MNIST example, unchanged but for its data source, as two real clients."""
    vision = layout_for_torchvision(tmp_path / "torchvision", idx_folder(tmp_path / "idx"))
    example = ROOT / "examples" / "mnist"
    data = [
        "--data.init_args.source=torchvision",
        f"--data.init_args.root={vision}",
        "--data.init_args.train_pool=1500",
        "--data.init_args.batch_size=32",
    ]
    workdir = tmp_path / "run"
    done = subprocess.run(
        simulate_command(
            workdir,
            "--aggregator-arg=--trainer.strategy.init_args.rounds=5",
            *(f"--aggregator-arg={a}" for a in data),
            *(f"--client-arg={a}" for a in data),
            "--client-arg=--data.init_args.augment=true",
            example=example,
            task_id="vision",
        ),
        capture_output=True,
        text=True,
        timeout=280,
        cwd=tmp_path,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    report = json.loads(
        (workdir / "aggregator" / "fedavg" / "vision" / "aggregator" / "report.json").read_text()
    )
    assert report["rounds_completed"] == 5
    # 5 rounds of the seed's ConvNet on 1,500 real (scaled-up) digits: far above chance (0.1).
    assert report["test_metrics"]["test_acc"] > 0.5, report["test_metrics"]
