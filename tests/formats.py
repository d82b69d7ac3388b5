"""Writers of tiny files in each real dataset format, for testing the real parsers."""

from __future__ import annotations

import gzip
import hashlib
import io
import struct
import tarfile
from pathlib import Path

import numpy as np

from ablation.data.datasets import RemoteFile

ADULT_CATEGORIES = {
    1: ["Private", "Self-emp-not-inc", "State-gov"],
    3: ["Bachelors", "HS-grad", "Masters", "Some-college"],
    5: ["Married-civ-spouse", "Never-married", "Divorced"],
    6: ["Adm-clerical", "Exec-managerial", "Craft-repair"],
    7: ["Husband", "Not-in-family", "Own-child"],
    8: ["White", "Black"],
    9: ["Male", "Female"],
    13: ["United-States", "Mexico", "India"],
}


def adult_rows(n: int, seed: int, test: bool) -> list[str]:
    """Adult records in UCI's format; every 7th has a '?'; label follows capital gain."""
    rng = np.random.RandomState(seed)
    lines = []
    for i in range(n):
        fields = []
        for col in range(14):
            if col in ADULT_CATEGORIES:
                fields.append(rng.choice(ADULT_CATEGORIES[col]))
            else:
                fields.append(str(int(rng.randint(1, 100 if col != 2 else 400_000))))
        if i % 7 == 3:
            fields[rng.choice([1, 6, 13])] = "?"
        rich = int(fields[10]) > 50
        label = ">50K" if rich else "<=50K"
        fields.append(label + ("." if test else ""))
        lines.append(", ".join(fields))
    return lines


def write_adult(folder: Path, n_train: int = 40, n_test: int = 20) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "adult.data"
    test = folder / "adult.test"
    data.write_text("\n".join(adult_rows(n_train, 0, False)) + "\n\n")
    test.write_text("|1x3 Cross validator\n" + "\n".join(adult_rows(n_test, 1, True)) + "\n\n")
    return data, test


def write_idx(path: Path, array: np.ndarray) -> Path:
    """An unsigned-byte IDX file, gzipped when the name ends in .gz."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + np.asarray(array, np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)
    return path


def mnist_with_signal(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """28×28 uint8 images whose label k is drawn as a bright band at rows 2k..2k+4, plus noise."""
    rng = np.random.RandomState(seed)
    labels = rng.randint(0, 10, n).astype(np.uint8)
    images = rng.randint(0, 60, (n, 28, 28)).astype(np.uint8)
    for i, k in enumerate(labels):
        images[i, 2 * k:2 * k + 5, 4:24] = 255
    return images, labels


def write_mnist(folder: Path, n_train: int = 256, n_test: int = 64) -> list[Path]:
    xs, ys = mnist_with_signal(n_train, 0)
    xt, yt = mnist_with_signal(n_test, 1)
    return [write_idx(folder / "train-images-idx3-ubyte.gz", xs),
            write_idx(folder / "train-labels-idx1-ubyte.gz", ys),
            write_idx(folder / "t10k-images-idx3-ubyte.gz", xt),
            write_idx(folder / "t10k-labels-idx1-ubyte.gz", yt)]


def write_imdb(path: Path, train: list[list[int]], test: list[list[int]]) -> Path:
    """Keras' imdb.npz layout: object arrays of word-index lists (pickled inside the npz)."""
    def objects(seqs):
        out = np.empty(len(seqs), dtype=object)
        for i, s in enumerate(seqs):
            out[i] = list(s)
        return out
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        np.savez(f, x_train=objects(train), y_train=np.arange(len(train)) % 2,
                 x_test=objects(test), y_test=np.arange(len(test)) % 2)
    return path


def cifar_records(labels: np.ndarray, images: np.ndarray) -> bytes:
    """CIFAR-10 binary records: label byte, then the R, G and B planes (row-major 32×32)."""
    out = bytearray()
    for label, image in zip(labels, images):  # image [32, 32, 3] uint8
        out.append(int(label))
        out += image.transpose(2, 0, 1).tobytes()
    return bytes(out)


def write_cifar(path: Path, per_batch: int = 4, extra_members: dict[str, bytes] | None = None,
                seed: int = 0) -> tuple[Path, np.ndarray, np.ndarray]:
    """A cifar-10-binary.tar.gz; returns it with the train images and labels it holds."""
    rng = np.random.RandomState(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    all_x, all_y = [], []
    with tarfile.open(path, "w:gz") as tar:
        members = [f"cifar-10-batches-bin/data_batch_{i}.bin" for i in range(1, 6)]
        members.append("cifar-10-batches-bin/test_batch.bin")
        for name in members:
            y = rng.randint(0, 10, per_batch).astype(np.uint8)
            x = rng.randint(0, 256, (per_batch, 32, 32, 3)).astype(np.uint8)
            if "data_batch" in name:
                all_x.append(x)
                all_y.append(y)
            _add(tar, name, cifar_records(y, x))
        for name, payload in (extra_members or {}).items():
            _add(tar, name, payload)
    return path, np.concatenate(all_x), np.concatenate(all_y)


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def remote_for(path: Path) -> RemoteFile:
    """A RemoteFile that 'downloads' ``path`` through a file:// URL, with its real checksum."""
    return RemoteFile(path.name, path.resolve().as_uri(),
                      hashlib.sha256(path.read_bytes()).hexdigest())
