"""The paper's four real datasets: download, verify, cache and parse them as the paper did.

Every file comes from its canonical location and is checked against a pinned SHA-256 before
anything reads it (the IMDb file is a pickle-based ``.npz``, so it is opened only after its
checksum matches). Downloads and extractions are written to a temporary name and renamed into
place, so the cache never holds half a file; archives are extracted member by member and a
member that would land outside the target folder is refused.

Cache folder: ``cache_dir`` argument, else ``$DPSGD_DATA_DIR``, else
``~/.cache/dpsgd-ablation``; each dataset in its own subfolder. Parsed arrays are kept beside
the raw files as ``prepared.npz`` (plain arrays, no pickle) so later runs start fast; the file
records the source checksums and :func:`preparation_version` (a hash of the parsing code), and
is prepared again when either changes, so a parser change never reuses stale arrays.

=========  ===================================================================================
dataset    preparation (as the paper's code did)
=========  ===================================================================================
adult      UCI ``adult.data`` + ``adult.test``: rows with a missing value (``?``) dropped, the 8
           categorical columns one-hot encoded over both files, the 6 continuous ones divided by
           their column maximum, labels ``>50K`` → 1 else 0, both files stacked and shuffled with
           the reference seed → 45,220 × 104. The reference preprocessing (dpml-benchmark) also
           drops the last complete row of each file; that is kept so the shape is the paper's.
           There is no test split (the paper trained on all of it).
mnist      the IDX files, scaled to [0, 1], ``[N, 28, 28, 1]``.
imdb       Keras' ``imdb.npz`` word indices with ``num_words=10000``, ``index_from=3``,
           ``start_char=1``, ``oov_char=2`` and Keras' shuffle (seed 113), then padded and
           truncated at the front to 256 tokens; ids lie in [0, 10000) (embedding: 10,004 rows).
cifar10    the binary version's fixed-size records (1 label byte + 3,072 pixel bytes, planar
           RGB), scaled to [0, 1], ``[N, 32, 32, 3]``.
=========  ===================================================================================
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

ENV_VAR = "DPSGD_DATA_DIR"
PREPARED = "prepared.npz"
DOWNLOAD_TIMEOUT_S = 60


class DatasetUnavailable(RuntimeError):
    """A dataset file is missing, cannot be downloaded, or fails its checksum (one line)."""


class NotDownloaded(DatasetUnavailable):
    """A file is not in the cache and could not (or may not) be downloaded."""

    def __init__(self, remote: "RemoteFile", target: Path, reason: str):
        self.remote, self.target, self.reason = remote, target, reason
        super().__init__(f"could not get {remote.name} ({reason}): download {remote.url} by "
                         f"hand and put it at {target}")


@dataclasses.dataclass(frozen=True)
class RemoteFile:
    """A file of a dataset: where it comes from and the SHA-256 it must have."""

    name: str
    url: str
    sha256: str


_UCI = "https://archive.ics.uci.edu/ml/machine-learning-databases/adult/"
_MNIST = "https://storage.googleapis.com/cvdf-datasets/mnist/"

#: Pinned sources of every dataset.
SOURCES: dict[str, tuple[RemoteFile, ...]] = {
    "adult": (
        RemoteFile("adult.data", _UCI + "adult.data",
                   "5b00264637dbfec36bdeaab5676b0b309ff9eb788d63554ca0a249491c86603d"),
        RemoteFile("adult.test", _UCI + "adult.test",
                   "a2a9044bc167a35b2361efbabec64e89d69ce82d9790d2980119aac5fd7e9c05"),
    ),
    "mnist": (
        RemoteFile("train-images-idx3-ubyte.gz", _MNIST + "train-images-idx3-ubyte.gz",
                   "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
        RemoteFile("train-labels-idx1-ubyte.gz", _MNIST + "train-labels-idx1-ubyte.gz",
                   "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"),
        RemoteFile("t10k-images-idx3-ubyte.gz", _MNIST + "t10k-images-idx3-ubyte.gz",
                   "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
        RemoteFile("t10k-labels-idx1-ubyte.gz", _MNIST + "t10k-labels-idx1-ubyte.gz",
                   "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"),
    ),
    "imdb": (
        RemoteFile("imdb.npz", "https://storage.googleapis.com/tensorflow/tf-keras-datasets/imdb.npz",
                   "69664113be75683a8fe16e3ed0ab59fda8886cb3cd7ada244f7d9544e4676b9f"),
    ),
    "cifar10": (
        RemoteFile("cifar-10-binary.tar.gz", "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
                   "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd"),
    ),
}


def default_cache_dir() -> Path:
    """``$DPSGD_DATA_DIR`` or ``~/.cache/dpsgd-ablation``."""
    env = os.environ.get(ENV_VAR)
    return Path(env) if env else Path.home() / ".cache" / "dpsgd-ablation"


# ---------------------------------------------------------------------------------------------
# Fetching and verifying.


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _manual_hint(remote: RemoteFile, target: Path) -> str:
    return f"download {remote.url} by hand and put it at {target}"


def fetch(remote: RemoteFile, folder: Path, *, download: bool = True) -> Path:
    """The verified local copy of ``remote`` in ``folder``, downloading it if needed.

    Raises:
      DatasetUnavailable: offline (or ``download=False``) with no cached copy, or a checksum
        mismatch; the message names the file, its source and where to put it by hand. A file
        that fails its checksum is never left in the cache.
    """
    target = folder / remote.name
    if target.exists():
        actual = sha256_of(target)
        if actual == remote.sha256:
            return target
        raise DatasetUnavailable(
            f"{target} has SHA-256 {actual}, expected {remote.sha256}: delete it, or "
            f"{_manual_hint(remote, target)}")
    if not download:
        raise NotDownloaded(remote, target, "not in the cache and data.download=false")
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{remote.name}.", suffix=".part", dir=folder)
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(remote.url, timeout=DOWNLOAD_TIMEOUT_S) as response:
                    for chunk in iter(lambda: response.read(1 << 20), b""):
                        digest.update(chunk)
                        out.write(chunk)
            except (urllib.error.URLError, OSError, ValueError) as error:
                reason = getattr(error, "reason", error)
                raise NotDownloaded(remote, target, f"download failed: {reason}") from None
        if digest.hexdigest() != remote.sha256:
            raise DatasetUnavailable(
                f"{remote.name} from {remote.url} has SHA-256 {digest.hexdigest()}, expected "
                f"{remote.sha256}; nothing was cached: {_manual_hint(remote, target)}")
        os.replace(tmp, target)
        return target
    finally:
        tmp.unlink(missing_ok=True)


def fetch_all(name: str, cache_dir: str | os.PathLike | None = None, *, download: bool = True,
              sources: Mapping[str, Sequence[RemoteFile]] | None = None) -> list[Path]:
    """Fetch and verify every file of dataset ``name``; returns their paths."""
    sources = SOURCES if sources is None else sources
    if name not in sources:
        raise ValueError(f"unknown dataset {name!r}; valid: {', '.join(sources)}")
    folder = (Path(cache_dir) if cache_dir else default_cache_dir()) / name
    paths, missing = [], []
    for remote in sources[name]:
        try:
            paths.append(fetch(remote, folder, download=download))
        except NotDownloaded as error:
            missing.append(error)
    if len(missing) == 1:
        raise missing[0]
    if missing:  # one line naming every file to fetch by hand
        urls = " ".join(m.remote.url for m in missing)
        raise DatasetUnavailable(f"{len(missing)} files of {name} are not available "
                                 f"({missing[0].reason}): download {urls} by hand into {folder}")
    return paths


def safe_extract_member(archive: tarfile.TarFile, member_name: str, dest: Path) -> Path:
    """Extract one regular file of ``archive`` under ``dest``, atomically.

    Raises:
      DatasetUnavailable: the member is not a regular file or would land outside ``dest``
        (absolute paths, ``..``, links).
    """
    member = archive.getmember(member_name)
    dest = dest.resolve()
    target = (dest / member.name).resolve()
    if os.path.isabs(member.name) or dest not in target.parents:
        raise DatasetUnavailable(f"refusing archive member {member.name!r}: it would be written "
                                 f"outside {dest}")
    if not member.isfile():
        raise DatasetUnavailable(f"refusing archive member {member.name!r}: not a regular file")
    target.parent.mkdir(parents=True, exist_ok=True)
    source = archive.extractfile(member)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(source, out)
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target


def check_archive(archive: tarfile.TarFile, dest: Path) -> None:
    """Refuse an archive if any member would escape ``dest`` (checked before extracting)."""
    dest = dest.resolve()
    for member in archive.getmembers():
        target = (dest / member.name).resolve()
        if os.path.isabs(member.name) or (target != dest and dest not in target.parents):
            raise DatasetUnavailable(f"refusing archive: member {member.name!r} would be "
                                     f"written outside {dest}")
        if (member.issym() or member.islnk()) and (
                os.path.isabs(member.linkname)
                or dest not in (target.parent / member.linkname).resolve().parents):
            raise DatasetUnavailable(f"refusing archive: link {member.name!r} points outside "
                                     f"{dest}")


# ---------------------------------------------------------------------------------------------
# Parsers (one per format). Each returns float32/int32 arrays.


ADULT_CONTINUOUS = (0, 2, 4, 10, 11, 12)
ADULT_LABEL = 14
ADULT_SHUFFLE_SEED = 10000019  # the reference preprocessing's seed


def _adult_rows(path: Path) -> list[list[str]]:
    """Complete records of an Adult file, like the reference: no '?' field, then the last
    complete record dropped (its ``[:-2]`` slice removed one record beyond the blank line)."""
    rows = []
    for line in path.read_text().splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 15:  # blank lines and the test file's "|1x3 Cross validator" line
            continue
        if "?" in fields:
            continue
        rows.append(fields)
    return rows[:-1]


def parse_adult(data_path: Path, test_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Adult as the paper's source prepared it: ``x [N, 104]`` float32, ``y [N]`` int32."""
    rows = _adult_rows(data_path) + _adult_rows(test_path)
    if not rows:
        raise DatasetUnavailable(f"no complete records in {data_path} and {test_path}")
    table = np.array(rows, dtype=object)
    onehots, continuous = [], []
    for col in range(ADULT_LABEL):
        values = table[:, col]
        if col in ADULT_CONTINUOUS:
            numbers = values.astype(np.float64)
            continuous.append(numbers / numbers.max())
        else:
            categories = sorted(set(values))
            index = {c: i for i, c in enumerate(categories)}
            codes = np.array([index[v] for v in values])
            onehots.append(np.eye(len(categories))[codes])
    labels = np.array([0 if v.rstrip(".") == "<=50K" else 1 for v in table[:, ADULT_LABEL]])
    data = np.column_stack(onehots + continuous + [labels])
    np.random.RandomState(ADULT_SHUFFLE_SEED).shuffle(data)
    return data[:, :-1].astype(np.float32), data[:, -1].astype(np.int32)


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (optionally gzipped): magic ``0x0000 08 ndim``, big-endian dims, uint8 data."""
    opener: Callable = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DatasetUnavailable(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(int)
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DatasetUnavailable(f"{path}: {data.size} bytes of data for dims {tuple(dims)}")
    return data.reshape(tuple(dims))


def parse_mnist(images: Path, labels: Path) -> tuple[np.ndarray, np.ndarray]:
    """MNIST IDX files → ``x [N, 28, 28, 1]`` in [0, 1], ``y [N]`` int32."""
    x = read_idx(images).astype(np.float32)[..., None] / 255.0
    y = read_idx(labels).astype(np.int32)
    if x.shape[0] != y.shape[0]:
        raise DatasetUnavailable(f"{images} has {x.shape[0]} images, {labels} {y.shape[0]} labels")
    return x, y


IMDB_NUM_WORDS, IMDB_INDEX_FROM, IMDB_START, IMDB_OOV, IMDB_SEED, IMDB_LEN = (
    10_000, 3, 1, 2, 113, 256)


def _pad_front(sequences: Sequence[Sequence[int]], length: int) -> np.ndarray:
    """Keras' ``pad_sequences`` defaults: keep the last ``length`` ids, zeros in front."""
    out = np.zeros((len(sequences), length), np.int32)
    for i, seq in enumerate(sequences):
        tail = list(seq)[-length:]
        if tail:
            out[i, length - len(tail):] = tail
    return out


def parse_imdb(path: Path, expected_sha256: str) -> dict[str, np.ndarray]:
    """Keras' imdb.npz → train/test ``x [N, 256]`` int32 ids in [0, 10000), ``y [N]`` int32.

    The file stores Python lists (a pickle inside the npz): it is opened with
    ``allow_pickle=True`` only after its SHA-256 matches ``expected_sha256``.
    """
    actual = sha256_of(path)
    if actual != expected_sha256:
        raise DatasetUnavailable(f"{path} has SHA-256 {actual}, expected {expected_sha256}; "
                                 f"refusing to unpickle it")
    with np.load(path, allow_pickle=True) as f:
        x_train, y_train, x_test, y_test = f["x_train"], f["y_train"], f["x_test"], f["y_test"]
    rng = np.random.RandomState(IMDB_SEED)  # Keras shuffles train, then test, with one stream
    order = np.arange(len(x_train))
    rng.shuffle(order)
    x_train, y_train = x_train[order], y_train[order]
    order = np.arange(len(x_test))
    rng.shuffle(order)
    x_test, y_test = x_test[order], y_test[order]

    def encode(xs):
        return [[IMDB_START] + [w + IMDB_INDEX_FROM if w + IMDB_INDEX_FROM < IMDB_NUM_WORDS
                                else IMDB_OOV for w in x] for x in xs]

    return {"x_train": _pad_front(encode(x_train), IMDB_LEN), "y_train": y_train.astype(np.int32),
            "x_test": _pad_front(encode(x_test), IMDB_LEN), "y_test": y_test.astype(np.int32)}


CIFAR_RECORD = 1 + 3 * 32 * 32
CIFAR_DIR = "cifar-10-batches-bin"
CIFAR_TRAIN = tuple(f"{CIFAR_DIR}/data_batch_{i}.bin" for i in range(1, 6))
CIFAR_TEST = (f"{CIFAR_DIR}/test_batch.bin",)


def read_cifar_records(raw: bytes, source: str) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 binary records → ``x [N, 32, 32, 3]`` in [0, 1], ``y [N]`` int32."""
    if len(raw) % CIFAR_RECORD:
        raise DatasetUnavailable(f"{source}: {len(raw)} bytes is not a whole number of "
                                 f"{CIFAR_RECORD}-byte records")
    records = np.frombuffer(raw, np.uint8).reshape(-1, CIFAR_RECORD)
    y = records[:, 0].astype(np.int32)
    x = records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).astype(np.float32) / 255.0
    return x, y


def parse_cifar10(archive_path: Path, extract_to: Path) -> dict[str, np.ndarray]:
    """The binary CIFAR-10 archive → train/test arrays (members checked, then extracted)."""
    with tarfile.open(archive_path, "r:gz") as archive:
        check_archive(archive, extract_to)
        splits = {}
        for split, members in (("train", CIFAR_TRAIN), ("test", CIFAR_TEST)):
            parts = [read_cifar_records(safe_extract_member(archive, m, extract_to).read_bytes(), m)
                     for m in members]
            splits[f"x_{split}"] = np.concatenate([p[0] for p in parts])
            splits[f"y_{split}"] = np.concatenate([p[1] for p in parts])
    return splits


# ---------------------------------------------------------------------------------------------
# Preparing and loading.


def prepare(name: str, paths: Sequence[Path], remotes: Sequence[RemoteFile]) -> dict[str, np.ndarray]:
    """Parse the verified raw files of ``name`` into arrays (keys x_train, y_train, …)."""
    if name == "adult":
        x, y = parse_adult(paths[0], paths[1])
        return {"x_train": x, "y_train": y}
    if name == "mnist":
        x, y = parse_mnist(paths[0], paths[1])
        xt, yt = parse_mnist(paths[2], paths[3])
        return {"x_train": x, "y_train": y, "x_test": xt, "y_test": yt}
    if name == "imdb":
        return parse_imdb(paths[0], remotes[0].sha256)
    if name == "cifar10":
        return parse_cifar10(paths[0], paths[0].parent / "extracted")
    raise ValueError(f"unknown dataset {name!r}")


def preparation_version() -> str:
    """A hash of the code that turns raw files into arrays (the parsers and their constants).

    Any change to it, a comment included, prepares the cached arrays again.
    """
    import inspect
    import sys
    module = sys.modules[__name__]
    source = inspect.getsource(module)
    start, end = source.index("# Parsers (one per format)"), source.index("def _save_npz_atomic")
    return hashlib.sha256(source[start:end].encode()).hexdigest()[:16]


def _save_npz_atomic(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _content_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """A SHA-256 of the prepared arrays (names, dtypes, shapes and bytes)."""
    digest = hashlib.sha256()
    for key in sorted(arrays):
        a = np.ascontiguousarray(arrays[key])
        digest.update(f"{key}:{a.dtype.str}:{a.shape}".encode())
        digest.update(a.data)
    return digest.hexdigest()


def _read_prepared(path: Path, stamp: Mapping[str, np.ndarray]) -> dict[str, np.ndarray] | None:
    """The cached arrays if the file is whole, of these sources and parser, and holds exactly
    what was prepared (its content digest); None (prepare again) otherwise, saying why when
    the file is damaged or altered."""
    try:
        with np.load(path, allow_pickle=False) as f:
            if not all(key in f and str(f[key]) == str(value) for key, value in stamp.items()):
                return None  # other sources or another parser: stale, not damaged
            arrays = {k: f[k] for k in f.files if k not in stamp and k != "content"}
            recorded = str(f["content"]) if "content" in f else None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        print(f"[data] {path} is damaged ({type(error).__name__}: {error}); preparing it again",
              flush=True)
        return None
    if recorded != _content_digest(arrays):
        print(f"[data] {path} does not hold what was prepared (its content digest differs); "
              "preparing it again", flush=True)
        return None
    return arrays


def load(name: str, *, split: str = "train", cache_dir: str | os.PathLike | None = None,
         download: bool = True,
         sources: Mapping[str, Sequence[RemoteFile]] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` of dataset ``name``'s ``split`` (``train`` or ``test``) as numpy arrays.

    Raises:
      DatasetUnavailable: see :func:`fetch`; also for ``split="test"`` of Adult (none).
    """
    sources = SOURCES if sources is None else sources
    paths = fetch_all(name, cache_dir, download=download, sources=sources)
    remotes = sources[name]
    prepared = paths[0].parent / PREPARED
    stamp = {"sources": np.array(",".join(r.sha256 for r in remotes)),
             "preparation": np.array(preparation_version())}
    arrays = _read_prepared(prepared, stamp) if prepared.exists() else None
    if arrays is None:
        arrays = prepare(name, paths, remotes)
        _save_npz_atomic(prepared, {**arrays, **stamp,
                                    "content": np.array(_content_digest(arrays))})
    if f"x_{split}" not in arrays:
        raise DatasetUnavailable(f"dataset {name} has no {split} split")
    return arrays[f"x_{split}"], arrays[f"y_{split}"]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ablation.datasets NAME... [--cache-dir DIR]``: fetch and verify datasets."""
    import argparse
    parser = argparse.ArgumentParser(prog="python -m ablation.datasets",
                                     description="Fetch, verify and prepare datasets.")
    parser.add_argument("names", nargs="+", choices=sorted(SOURCES))
    parser.add_argument("--cache-dir", default=None, help=f"default: ${ENV_VAR} or "
                        "~/.cache/dpsgd-ablation")
    args = parser.parse_args(argv)
    status = 0
    for name in args.names:
        try:
            x, y = load(name, cache_dir=args.cache_dir)
            print(f"{name}: ok, train x {x.shape} {x.dtype}, y {y.shape}")
        except DatasetUnavailable as error:
            print(f"{name}: {error}")
            status = 1
    return status


if __name__ == "__main__":
    raise SystemExit(main())
