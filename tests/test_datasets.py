"""Real-dataset loaders on tiny files in the real formats: parsing, caching, safety, errors."""

from __future__ import annotations

import tarfile

import numpy as np
import pytest

from ablation.data import datasets
from ablation.data.datasets import (DatasetUnavailable, RemoteFile, check_archive, fetch,
                                    parse_adult, parse_cifar10, parse_imdb, parse_mnist)
from ablation.measure.settings import CellConfig, PrivacyConfig, TimingConfig
from tests import formats
from tests.cli import QUICK, run_cli


def test_adult_is_prepared_like_the_reference(tmp_path):
    data, test = formats.write_adult(tmp_path, n_train=40, n_test=20)
    x, y = parse_adult(data, test)
    complete = [r for r in formats.adult_rows(40, 0, False) if "?" not in r.split(", ")]
    complete_test = [r for r in formats.adult_rows(20, 1, True) if "?" not in r.split(", ")]
    # Missing rows dropped, and the reference's extra last-row drop in each file.
    assert x.shape[0] == len(complete) - 1 + len(complete_test) - 1 == y.shape[0]
    rows = [r.split(", ") for r in complete[:-1] + complete_test[:-1]]
    n_onehot = sum(len({r[c] for r in rows}) for c in formats.ADULT_CATEGORIES)
    assert x.shape[1] == n_onehot + 6 and x.dtype == np.float32 and y.dtype == np.int32
    onehot, continuous = x[:, :n_onehot], x[:, n_onehot:]
    np.testing.assert_array_equal(onehot.sum(axis=1), 8)  # one category per column
    assert set(np.unique(onehot)) == {0.0, 1.0}
    np.testing.assert_allclose(continuous.max(axis=0), 1.0)
    assert continuous.min() > 0
    # Labels: capital gain (continuous column 3 of 6) above 50 ⇔ ">50K" ⇔ 1.
    gains = np.array(sorted(int(r[10]) for r in rows))
    recovered = np.sort(np.round(continuous[:, 3] * gains.max()).astype(int))
    np.testing.assert_array_equal(recovered, gains)
    np.testing.assert_array_equal(y, (np.round(continuous[:, 3] * gains.max()) > 50).astype(int))


def test_mnist_idx(tmp_path):
    paths = formats.write_mnist(tmp_path, n_train=20, n_test=5)
    x, y = parse_mnist(paths[0], paths[1])
    images, labels = formats.mnist_with_signal(20, 0)
    assert x.shape == (20, 28, 28, 1) and x.dtype == np.float32
    np.testing.assert_allclose(x[..., 0], images / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(y, labels)
    assert x.min() >= 0 and x.max() == 1.0


def test_idx_rejects_truncated_files(tmp_path):
    path = formats.write_idx(tmp_path / "bad-idx3-ubyte", np.zeros((2, 3, 3), np.uint8))
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(DatasetUnavailable, match="bytes of data for dims"):
        datasets.read_idx(path)


def test_imdb_keras_format(tmp_path):
    short = [5, 6]
    long = list(range(1, 301))  # 300 ids, some ≥ 10000 after index_from
    big = [9_996, 9_997, 20_000]
    path = formats.write_imdb(tmp_path / "imdb.npz", [short, long, big], [short])
    remote = formats.remote_for(path)
    out = parse_imdb(path, remote.sha256)
    x = out["x_train"]
    assert x.shape == (3, 256) and x.dtype == np.int32
    assert x.min() >= 0 and x.max() < 10_000
    rows = {tuple(r[r > 0][-3:]) for r in x}
    # start char 1, ids + 3, front padding:
    assert (1, 8, 9) in rows
    # oov: 9996 + 3 = 9999 stays, 9997 + 3 = 10000 and 20003 become 2.
    assert (9_999, 2, 2) in rows
    # The long review is truncated at the front: its last 256 ids survive, no start char.
    long_row = next(r for r in x if r[-1] == 303)
    np.testing.assert_array_equal(long_row, np.arange(48, 304))
    # Keras' shuffle (seed 113) permutes reviews and labels together.
    assert sorted(out["y_train"].tolist()) == [0, 0, 1]


def test_imdb_pickle_is_refused_before_checksum(tmp_path):
    path = formats.write_imdb(tmp_path / "imdb.npz", [[1]], [[1]])
    with pytest.raises(DatasetUnavailable, match="refusing to unpickle"):
        parse_imdb(path, "0" * 64)


def test_cifar10_binary(tmp_path):
    archive, images, labels = formats.write_cifar(tmp_path / "cifar-10-binary.tar.gz", per_batch=3)
    out = parse_cifar10(archive, tmp_path / "extracted")
    assert out["x_train"].shape == (15, 32, 32, 3) and out["x_test"].shape == (3, 32, 32, 3)
    np.testing.assert_allclose(out["x_train"], images / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(out["y_train"], labels)


def test_path_escaping_archive_is_refused(tmp_path):
    archive, _, _ = formats.write_cifar(tmp_path / "evil.tar.gz", per_batch=1,
                                        extra_members={"../escaped.bin": b"x" * 10})
    dest = tmp_path / "out" / "extracted"
    with pytest.raises(DatasetUnavailable, match="outside"):
        parse_cifar10(archive, dest)
    assert not (tmp_path / "out" / "escaped.bin").exists()
    assert not dest.exists() or not any(dest.rglob("*.bin"))
    with tarfile.open(archive) as tar, pytest.raises(DatasetUnavailable):
        check_archive(tar, dest)


def test_absolute_member_and_outside_link_are_refused(tmp_path):
    for name, kind in (("/etc/evil", tarfile.REGTYPE), ("link", tarfile.SYMTYPE)):
        path = tmp_path / f"a{kind!r}.tar"
        with tarfile.open(path, "w") as tar:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.linkname = "../../outside" if kind == tarfile.SYMTYPE else ""
            tar.addfile(info, None if kind == tarfile.SYMTYPE else __import__("io").BytesIO(b""))
        with tarfile.open(path) as tar, pytest.raises(DatasetUnavailable, match="outside"):
            check_archive(tar, tmp_path / "dest")


# -- fetching -------------------------------------------------------------------------------------


def test_fetch_verifies_and_caches(tmp_path):
    source = tmp_path / "src" / "adult.data"
    source.parent.mkdir()
    source.write_text("hello\n")
    remote = formats.remote_for(source)
    cache = tmp_path / "cache"
    got = fetch(remote, cache)
    assert got == cache / "adult.data" and got.read_text() == "hello\n"
    source.unlink()  # cached: no second download
    assert fetch(remote, cache) == got


def test_checksum_mismatch_leaves_nothing_in_the_cache(tmp_path):
    source = tmp_path / "src" / "adult.data"
    source.parent.mkdir()
    source.write_text("tampered\n")
    remote = RemoteFile("adult.data", source.resolve().as_uri(), "0" * 64)
    cache = tmp_path / "cache"
    with pytest.raises(DatasetUnavailable, match="expected 0000") as info:
        fetch(remote, cache)
    assert list(cache.iterdir()) == []  # no file, no partial download
    message = str(info.value)
    assert "\n" not in message and remote.url in message and str(cache / "adult.data") in message


def test_corrupt_cached_file_is_reported(tmp_path):
    source = tmp_path / "adult.data"
    source.write_text("good\n")
    remote = formats.remote_for(source)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "adult.data").write_text("bad\n")
    with pytest.raises(DatasetUnavailable, match="delete it"):
        fetch(remote, tmp_path / "cache")


def test_offline_error_is_one_line_naming_the_file_source_and_destination(tmp_path):
    remote = RemoteFile("imdb.npz", "http://127.0.0.1:9/imdb.npz", "0" * 64)
    with pytest.raises(DatasetUnavailable) as info:
        fetch(remote, tmp_path)
    message = str(info.value)
    assert "\n" not in message
    assert "imdb.npz" in message and remote.url in message and str(tmp_path / "imdb.npz") in message
    assert list(tmp_path.iterdir()) == []


def test_cli_offline_message_without_traceback(tmp_path):
    proc = run_cli("ablation.run", "data=real", "model=cnn", f"data.cache_dir={tmp_path / 'c'}",
                   "data.download=false", *QUICK, output_dir=tmp_path / "out")
    assert proc.returncode == 1
    text = proc.stdout + proc.stderr
    assert "Traceback" not in text
    line = next(l for l in text.splitlines() if l.startswith("[error]"))
    assert "4 files of mnist are not available" in line
    assert "train-images-idx3-ubyte.gz" in line and str(tmp_path / "c" / "mnist") in line


# -- a real-format dataset end to end --------------------------------------------------------------


@pytest.fixture
def mnist_fixture(tmp_path, monkeypatch):
    """MNIST-format files with a learnable signal, registered as the mnist sources."""
    raw = formats.write_mnist(tmp_path / "src", n_train=512, n_test=128)
    monkeypatch.setitem(datasets.SOURCES, "mnist", tuple(formats.remote_for(p) for p in raw))
    return tmp_path / "cache"


def test_load_prepares_once_and_reuses(mnist_fixture):
    x, y = datasets.load("mnist", cache_dir=mnist_fixture)
    assert x.shape == (512, 28, 28, 1)
    prepared = mnist_fixture / "mnist" / datasets.PREPARED
    assert prepared.exists()
    stamp = prepared.stat().st_mtime_ns
    x2, _ = datasets.load("mnist", cache_dir=mnist_fixture)
    np.testing.assert_array_equal(x, x2)
    assert prepared.stat().st_mtime_ns == stamp
    xt, yt = datasets.load("mnist", split="test", cache_dir=mnist_fixture)
    assert xt.shape == (128, 28, 28, 1)


def test_a_parser_change_prepares_the_arrays_again(mnist_fixture, monkeypatch):
    """Issue 12.21: the prepared cache is tied to the parsing code, not only to the sources."""
    datasets.load("mnist", cache_dir=mnist_fixture)
    prepared = mnist_fixture / "mnist" / datasets.PREPARED
    stamp = prepared.stat().st_mtime_ns
    calls = []
    real_prepare = datasets.prepare
    monkeypatch.setattr(datasets, "prepare", lambda *a: calls.append(a) or real_prepare(*a))
    datasets.load("mnist", cache_dir=mnist_fixture)
    assert not calls  # same code: the cache is reused
    monkeypatch.setattr(datasets, "preparation_version", lambda: "a-changed-parser")
    datasets.load("mnist", cache_dir=mnist_fixture)
    assert len(calls) == 1 and prepared.stat().st_mtime_ns != stamp


def test_a_tampered_or_truncated_prepared_cache_is_prepared_again(mnist_fixture, capsys):
    """Issue 22.9: the cache was trusted by its stamp alone (a copy with all-zero images was
    used; a truncated one raised BadZipFile on every run)."""
    x, _ = datasets.load("mnist", cache_dir=mnist_fixture)
    prepared = mnist_fixture / "mnist" / datasets.PREPARED
    with np.load(prepared) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["x_train"] = np.zeros_like(arrays["x_train"])  # the stamp kept, the data changed
    np.savez(prepared, **arrays)
    x2, _ = datasets.load("mnist", cache_dir=mnist_fixture)
    assert np.array_equal(x2, x) and "does not hold what was prepared" in capsys.readouterr().out
    prepared.write_bytes(prepared.read_bytes()[:100])
    x3, _ = datasets.load("mnist", cache_dir=mnist_fixture)
    assert np.array_equal(x3, x) and "is damaged" in capsys.readouterr().out


def test_private_training_on_real_format_data_lowers_the_loss(mnist_fixture):
    from ablation.measure.timing import time_cell
    cell = CellConfig(engine="both", model="cnn", data="real", data_cache_dir=str(mnist_fixture),
                      batch_size=32, lr=0.5, dp=PrivacyConfig(clip_norm=1.0, noise_multiplier=0.5),
                      timing=TimingConfig(mode="epochs", epochs=4, progress=False))
    record = time_cell(cell, noise_multiplier=0.5)
    assert record["n_train"] == 512 and record["steps_per_epoch"] == 16
    assert record["loss_end"] < 0.5 * record["loss_start"], record
    assert record["test_accuracy"] > 0.5  # chance is 0.1
