"""Your own data: ``data=arrays data.path=FILE.npz``.

The file holds ``x [N, ...]`` and ``y [N]`` (and optionally ``x_test``, ``y_test``), checked
against the model's :class:`~models.registry.DatasetSpec` before anything runs: the shape of
one example, the dtype (float inputs, or integer token ids below the vocabulary size), integer
labels in ``[0, num_classes)``. Every problem is one line naming the array and what is wrong.
"""

from __future__ import annotations

import functools
import os
import zipfile
from pathlib import Path

import numpy as np

from models import DatasetSpec


class ArraysError(ValueError):
    """A data file that does not fit the model; the message is one line."""


def _open(path: str | os.PathLike | None) -> Path:
    if not path:
        raise ArraysError("data=arrays needs data.path=FILE.npz (arrays x and y)")
    path = Path(path).expanduser()
    if not path.is_file():
        raise ArraysError(f"data.path={path}: no such file")
    if not zipfile.is_zipfile(path):
        raise ArraysError(f"data.path={path}: not an .npz file (numpy.savez)")
    return path


def array_rows(path: str | os.PathLike | None) -> int:
    """How many training examples the file holds (its ``x``'s first axis), read from the
    array's header alone."""
    path = _open(path)
    with zipfile.ZipFile(path) as archive:
        if "x.npy" not in archive.namelist():
            raise ArraysError(f"data.path={path}: no array 'x' (it holds "
                              f"{', '.join(n.removesuffix('.npy') for n in archive.namelist())})")
        with archive.open("x.npy") as f:
            version = np.lib.format.read_magic(f)
            read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                    else np.lib.format.read_array_header_2_0)
            shape, _, _ = read(f)
    if not shape:
        raise ArraysError(f"data.path={path}: 'x' is a scalar, not [N, ...] examples")
    return int(shape[0])


def check_file(path: str | os.PathLike | None, spec: DatasetSpec) -> None:
    """Check the file's arrays against ``spec`` (both splits it holds), once per file version.

    Raises:
      ArraysError: as :func:`load_arrays`.
    """
    resolved = _open(path).resolve()
    _checked(str(resolved), resolved.stat().st_mtime_ns, spec)


@functools.lru_cache(maxsize=16)
def _checked(path: str, mtime_ns: int, spec: DatasetSpec) -> None:
    load_arrays(path, spec)
    with np.load(path, allow_pickle=False) as f:
        has_test = "x_test" in f.files or "y_test" in f.files
    if has_test:
        load_arrays(path, spec, split="test")


def load_arrays(path: str | os.PathLike | None, spec: DatasetSpec,
                split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` of the file's ``split`` (``train``: ``x``/``y``; ``test``: ``x_test``/
    ``y_test``), as float32 (or int32 ids) and int32 labels, checked against ``spec``.

    Raises:
      ArraysError: a missing array, or one that does not fit ``spec`` (one line).
    """
    path = _open(path)
    names = ("x", "y") if split == "train" else ("x_test", "y_test")
    with np.load(path, allow_pickle=False) as f:
        missing = [n for n in names if n not in f.files]
        if missing:
            raise ArraysError(f"data.path={path}: no array {missing[0]!r} (it holds "
                              f"{', '.join(f.files)})")
        x, y = f[names[0]], f[names[1]]
    return check_arrays(x, y, spec, f"data.path={path}", names)


def _check_range(where: str, name: str, values: np.ndarray, what: str, bound: str,
                 size: int) -> None:
    """Integers ``values`` (labels, token ids) must lie in ``0 .. size - 1``."""
    low, high = int(values.min()), int(values.max())
    if low < 0 or high >= size:
        raise ArraysError(f"{where}: {name} holds {what} {low}..{high}; {bound}, so "
                          f"0..{size - 1}")


def check_arrays(x: np.ndarray, y: np.ndarray, spec: DatasetSpec, where: str = "the data",
                 names: tuple[str, str] = ("x", "y")) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` in the dtypes the engines take, or :class:`ArraysError` naming the problem."""
    nx, ny = names
    if x.ndim < 1 or tuple(x.shape[1:]) != tuple(spec.input_shape):
        raise ArraysError(f"{where}: {nx} has shape {x.shape}; the model takes examples of "
                          f"shape {tuple(spec.input_shape)}, so [N, "
                          f"{', '.join(map(str, spec.input_shape))}]")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise ArraysError(f"{where}: {ny} has shape {y.shape}; it must be [N] with N = "
                          f"{x.shape[0]}, one label per example of {nx}")
    if x.shape[0] == 0:
        raise ArraysError(f"{where}: {nx} holds no examples")
    if not np.issubdtype(y.dtype, np.integer):
        raise ArraysError(f"{where}: {ny} must hold integer labels, not {y.dtype}")
    _check_range(where, ny, y, "labels", f"the model has {spec.num_classes} classes",
                 spec.num_classes)
    if spec.input_dtype == "int32":
        if not np.issubdtype(x.dtype, np.integer):
            raise ArraysError(f"{where}: {nx} must hold integer token ids, not {x.dtype}")
        _check_range(where, nx, x, "token ids", f"the vocabulary has {spec.vocab_size}",
                     spec.vocab_size)
        x = x.astype(np.int32)
    else:
        if not np.issubdtype(x.dtype, np.floating):
            raise ArraysError(f"{where}: {nx} must hold floating-point inputs, not {x.dtype}")
        if not np.all(np.isfinite(x)):
            raise ArraysError(f"{where}: {nx} holds NaN or infinite values")
        x = x.astype(np.float32)
    return x, y.astype(np.int32)
