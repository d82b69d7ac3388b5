"""Your own model: ``model=custom model.factory=MODULE:FUNCTION [model.kwargs={...}]``.

``FUNCTION(**kwargs)`` returns an :class:`~models.registry.Model` (a Haiku function ``inputs
[B, ...] -> logits [B, K]`` and the :class:`~models.registry.DatasetSpec` of its data). MODULE
is imported from the working directory or ``PYTHONPATH``, in the command and in every worker it
starts. :func:`load_factory` checks what the factory returns, once, before anything runs, and
:func:`source_digest` names the module's source, which is part of every record's identity (a
change to the file makes ``resume=true`` run the cells again).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import json
import os
import sys
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from models.registry import DatasetSpec, Model


class ModelError(ValueError):
    """A factory that cannot give a model the toolkit can run; the message is one line."""


def _split(factory: str) -> tuple[str, str]:
    module, sep, function = str(factory).partition(":")
    if not sep or not module or not function.isidentifier():
        raise ModelError(f"model.factory must be MODULE:FUNCTION (e.g. my_models:small_mlp), "
                         f"got {factory!r}")
    return module, function


def _import(module: str):
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` does: the working directory first
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ModelError(f"model.factory: cannot import {module!r} from the working directory "
                         f"or PYTHONPATH ({type(error).__name__}: {error})") from None


def load_factory(factory: str, kwargs: Mapping[str, Any] | str | None = None) -> Model:
    """The model ``factory`` (``MODULE:FUNCTION``) returns for ``kwargs`` (a mapping, or its
    JSON), checked: a :class:`Model` whose network maps a batch of its dataset's inputs to
    logits ``[B, K]``.

    Raises:
      ModelError: the module or function is missing, the call fails, or what it returns is not
        such a model (one line saying which).
    """
    text = kwargs if isinstance(kwargs, str) else json.dumps(dict(kwargs or {}), sort_keys=True)
    return _load(factory, text)


@functools.lru_cache(maxsize=32)
def _load(factory: str, kwargs_json: str) -> Model:
    module_name, function_name = _split(factory)
    module = _import(module_name)
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ModelError(f"model.factory: module {module_name!r} has no function "
                         f"{function_name!r}")
    kwargs = json.loads(kwargs_json)
    try:
        model = function(**kwargs)
    except Exception as error:  # noqa: BLE001 - the user's code: say what it raised
        raise ModelError(f"model.factory: {factory}(**{kwargs}) raised "
                         f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
                         ) from None
    check_model(model, factory)
    return model


def check_model(model: Any, where: str = "the model") -> None:
    """Refuse (one line) anything the toolkit cannot run as a model."""
    if not isinstance(model, Model):
        raise ModelError(f"{where} returned {type(model).__name__}, not an ablation.Model")
    spec = model.dataset
    if not isinstance(spec, DatasetSpec):
        raise ModelError(f"{where}: Model.dataset must be an ablation.DatasetSpec, got "
                         f"{type(spec).__name__}")
    if spec.input_dtype not in ("float32", "int32"):
        raise ModelError(f"{where}: DatasetSpec.input_dtype must be float32 or int32 (token "
                         f"ids), got {spec.input_dtype!r}")
    if spec.input_dtype == "int32" and not spec.vocab_size:
        raise ModelError(f"{where}: token inputs (int32) need DatasetSpec.vocab_size")
    if spec.num_classes < 2 or spec.n_train < 1:
        raise ModelError(f"{where}: DatasetSpec needs num_classes >= 2 and n_train >= 1")
    expected = 1 if model.binary_logit else spec.num_classes
    x = jax.ShapeDtypeStruct((2, *spec.input_shape), jnp.dtype(spec.input_dtype))
    try:
        params = jax.eval_shape(lambda: model.net.init(jax.random.key(0), jnp.zeros(x.shape,
                                                                                    x.dtype)))
        out = jax.eval_shape(model.net.apply, params, x)
    except Exception as error:  # noqa: BLE001 - the user's network: say what it raised
        raise ModelError(f"{where}: its network fails on a batch of inputs {tuple(x.shape)} "
                         f"{spec.input_dtype}: {type(error).__name__}: "
                         f"{str(error).splitlines()[0] if str(error) else ''}") from None
    if tuple(getattr(out, "shape", ())) != (2, expected):
        raise ModelError(f"{where}: its network maps inputs {tuple(x.shape)} to "
                         f"{tuple(getattr(out, 'shape', ()))}, not logits (2, {expected})")


def source_digest(factory: str) -> str | None:
    """A SHA-256 (16 hex digits) of the factory module's source file, or None if unknown."""
    module = _import(_split(factory)[0])
    try:
        path = inspect.getsourcefile(module)
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()[:16]
    except (OSError, TypeError):
        return None
