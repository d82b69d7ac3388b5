"""The memory probe: the largest batch size whose DP-SGD step fits under a memory cap.

Search: grow the batch size geometrically from ``start`` until a size does not fit, then
bisect between the largest size that fit and the smallest that did not, down to
``resolution``. Each try runs one real step (any engine, private or not; under Poisson
sampling the padded capacity that such a step really runs) in a fresh worker process, so a
failure cannot poison the next try. What "fits" means is measured the same way for every
engine on a device, and each record says what its cap limited (``cap_enforced``):

* GPU — the cap is enforced: XLA's allocator preallocates exactly the cap
  (``XLA_PYTHON_CLIENT_MEM_FRACTION``) and refuses anything beyond it
  (``RESOURCE_EXHAUSTED``). A device that reports no memory limit cannot be capped, and the
  probe refuses rather than record a cap it did not apply. The peak is the allocator's; when
  compilation (autotuning) left a higher peak than the step, the try says so (``peak_scope``).
* CPU — the cap is measured: a try fits when the step's own peak resident memory (parameters,
  optimizer state, batch and every buffer of the step; the kernel's high-water mark reset
  just before it, minus the resident memory then) is at most the cap. The step runs after the
  runtime started, the step compiled and one warm-up step, so neither compiler nor kernel
  caches count. An ``RLIMIT_DATA`` safety net (``max(2 × cap, cap + 1 GiB)`` of growth) stops a
  runaway try; failing under it means needing more than the cap.

A try that dies by a signal (or fails with another error) while limited is not taken as out of
memory on faith: the parent runs it again without any limit, and only if it then runs (CPU:
with a peak above the cap) is it out of memory (:mod:`ablation.sweep.jobs`). For jit engines
every try also records the peak the compiled step predicts (``compiled.memory_analysis()``),
and ``predict_only`` searches on predictions alone, compiling but running nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import resource
import time
from typing import Any, Callable, Iterator

import jax

from ablation.measure.settings import CellConfig, ProbeSettings, model_of

#: The CPU safety net: at most this much growth of the data segment during a try.
SAFETY_FACTOR, SAFETY_MIN_EXTRA = 2, 1 << 30


def safety_limit(cap_bytes: int) -> int:
    """Bytes of data-segment growth a CPU try may reach before it is stopped."""
    return max(SAFETY_FACTOR * cap_bytes, cap_bytes + SAFETY_MIN_EXTRA)


@dataclasses.dataclass
class Try:
    """One batch size tried: did it fit, and how much memory it took or was predicted to.

    ``batch_size`` is the (expected) batch size searched over; ``rows`` the examples the step
    really held (the padded capacity under Poisson sampling).
    """

    batch_size: int
    status: str  # ok | oom | error | timeout
    peak_bytes: int | None = None
    predicted_bytes: int | None = None
    error: str | None = None
    wall_s: float | None = None
    rows: int | None = None
    peak_scope: str | None = None
    verified: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def gap_allowed(fits: int, settings: ProbeSettings) -> int:
    """The largest gap between fitting and failing sizes at which bisection stops."""
    if settings.resolution >= 1:
        return int(settings.resolution)
    return max(1, int(settings.resolution * fits))


def _linear_fit(points: dict[int, int]) -> tuple[float, float] | None:
    """``(a, k)`` of ``bytes = a + k·b`` through the two largest batch sizes of ``points``.

    The compiled step's memory is linear in the batch size (per-example buffers). None with
    fewer than two sizes or a slope that is not positive.
    """
    sizes = sorted(points)
    if len(sizes) < 2:
        return None
    b0, b1 = sizes[-2], sizes[-1]
    slope = (points[b1] - points[b0]) / (b1 - b0)
    return None if slope <= 0 else (points[b1] - slope * b1, slope)


def predicted_max(tried: list[Try], limit_bytes: int | None) -> int | None:
    """The largest batch size whose peak, as the compiled step predicts it, fits the cap.

    Every try that carries a prediction counts, failed tries included. None without a cap or
    a fit (see :func:`_linear_fit`).
    """
    fit = _linear_fit({t.batch_size: t.predicted_bytes for t in tried if t.predicted_bytes})
    if limit_bytes is None or fit is None:
        return None
    intercept, slope = fit
    return max(0, int((limit_bytes - intercept) // slope))


def predicted_fit(tried: list[Try], limit_bytes: int | None) -> int | None:
    """Where the search should look next: the predictions of the tries that fit, scaled by
    the ratio of measured to predicted peak at the largest of them (allocator overhead) and
    solved for the cap. None without a cap or a fit (see :func:`_linear_fit`).
    """
    fitting = {t.batch_size: t for t in tried if t.status == "ok" and t.predicted_bytes}
    fit = _linear_fit({b: t.predicted_bytes for b, t in fitting.items()})
    if limit_bytes is None or fit is None:
        return None
    intercept, slope = fit
    largest = fitting[max(fitting)]
    ratio = max(1.0, largest.peak_bytes / largest.predicted_bytes) if largest.peak_bytes else 1.0
    return int((limit_bytes / ratio - intercept) // slope)


def search(try_size: Callable[[int], Try], settings: ProbeSettings) -> dict[str, Any]:
    """Find the largest batch size that fits; ``try_size(b)`` runs (or predicts) one try.

    Sizes grow geometrically, then bisect; where the compiled step predicts its memory (jit
    engines), the next size is where the prediction meets the cap whenever that lies in the
    open range, which usually saves most of the tries.

    Returns ``max_batch_size`` (0 when even 1 does not fit), ``tried`` (in order),
    ``status`` (``ok``, or ``error`` when a try failed for another reason than memory),
    ``reached_max`` and a one-line ``reason`` when the answer is 0 or the probe stopped.
    """
    tried: list[Try] = []
    cache: dict[int, Try] = {}

    def attempt(b: int) -> Try:
        if b not in cache:
            cache[b] = try_size(b)
            tried.append(cache[b])
        return cache[b]

    def stopped(t: Try) -> dict[str, Any]:
        return {"status": "error", "max_batch_size": None, "tried": tried, "reached_max": False,
                "reason": f"batch size {t.batch_size}: {t.error}"}

    def guess() -> int | None:
        return predicted_fit(tried, settings.limit_bytes)

    fits, fails = 0, None
    b = min(settings.start, settings.max_batch_size)
    guessed: set[int] = set()
    while True:  # grow
        t = attempt(b)
        if t.status == "ok":
            fits = b
            if b >= settings.max_batch_size:
                break
            g = guess()
            step_up = max(b + 1, int(math.ceil(b * settings.growth)))
            if g is not None and g > b:  # jump towards the predicted fit, but not wildly
                step_up = max(b + 1, min(g, int(b * settings.growth ** 8)))
                guessed.add(step_up)
            elif b in guessed:  # the prediction was right: bracket it closely from above
                step_up = b + 2 * gap_allowed(b, settings)
            b = min(settings.max_batch_size, step_up)
        elif t.status == "oom":
            fails = b
            break
        else:
            return stopped(t)
    if fits == 0:  # the start did not fit: shrink until something does
        b = fails
        while b > 1:
            b = max(1, int(b // settings.growth))
            t = attempt(b)
            if t.status == "ok":
                fits = b
                break
            if t.status != "oom":
                return stopped(t)
            fails = b
    if fits == 0:
        return {"status": "ok", "max_batch_size": 0, "tried": tried, "reached_max": False,
                "reason": f"batch size 1 does not fit: {attempt(1).error}"}
    guess_used = False
    while fails is not None and fails - fits > gap_allowed(fits, settings):  # bisect
        mid = (fits + fails) // 2
        g = guess()
        if not guess_used and g is not None and fits < g < fails:
            mid, guess_used = g, True  # once: near the cap the prediction is only so exact
        t = attempt(mid)
        if t.status == "ok":
            fits = mid
        elif t.status == "oom":
            fails = mid
        else:
            return stopped(t)
    return {"status": "ok", "max_batch_size": fits, "tried": tried,
            "reached_max": fails is None, "reason": None}


# ---------------------------------------------------------------------------------------------
# One try, inside the worker process.


def _proc_status_bytes(field: str) -> int:
    """A ``/proc/self/status`` field (VmData, VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) so later peaks belong to the step alone."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@contextlib.contextmanager
def _data_limit(extra_bytes: int | None) -> Iterator[None]:
    """Limit the process' data size to its current size plus ``extra_bytes`` (None: no limit).

    The previous limit comes back on exit, also after an out-of-memory error, so the worker
    can still report what happened.
    """
    if extra_bytes is None:
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    limit = _proc_status_bytes("VmData") + extra_bytes
    resource.setrlimit(resource.RLIMIT_DATA, (min(limit, hard) if hard != resource.RLIM_INFINITY
                                              else limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))


def predicted_peak(compiled) -> int | None:
    """Peak bytes a compiled executable predicts: arguments + outputs + temporaries − aliased."""
    try:
        stats = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - some backends do not implement it
        return None
    if stats is None:
        return None
    return int(stats.argument_size_in_bytes + stats.output_size_in_bytes
               + stats.temp_size_in_bytes - stats.alias_size_in_bytes)


def rows_of(cell: CellConfig, batch_size: int, n_train: int) -> int:
    """Examples one step of ``cell`` holds at (expected) ``batch_size``: the padded capacity
    under Poisson sampling, else the batch size."""
    if cell.dp.sampling != "poisson":
        return batch_size
    from ablation.data.samplers import poisson_capacity
    return poisson_capacity(batch_size, max(n_train, batch_size), cell.dp.capacity_sigmas,
                            cell.devices)


def try_batch(cell: CellConfig, noise_multiplier: float, batch_size: int, *,
              predict_only: bool = False, cap_bytes: int | None = None, n_train: int | None = None,
              on_predicted: Callable[[int], None] | None = None) -> dict[str, Any]:
    """One DP-SGD step of ``cell`` at ``batch_size`` (worker side); a :class:`Try` as a dict.

    ``cap_bytes`` is the cap on the CPU (measured against the step's peak, with a safety net;
    see the module docstring); None runs without any limit (also how a suspicious failure is
    verified). On a GPU the cap is the allocator's, set by the parent. The batch is synthetic
    with the dataset's shapes (the training set is not loaded: the probe measures the step).
    Exceptions propagate to the worker, which classifies them; ``on_predicted`` receives the
    compiled step's predicted peak before the step runs.
    """
    import jax.numpy as jnp

    from ablation.core.dpsgd import DPConfig, make_step, sgd
    from ablation.core.engines import get_engine
    from ablation.data.samplers import run_keys, synthetic

    start = time.perf_counter()
    jax.block_until_ready(jax.jit(lambda v: v + 1)(jnp.zeros(1)))  # start the runtime
    device = jax.devices()[0]
    on_cpu = device.platform == "cpu"
    model = model_of(cell)
    spec = model.dataset
    rows = rows_of(cell, batch_size, n_train or spec.n_train)
    poisson = rows != batch_size or cell.dp.sampling == "poisson"
    engine = get_engine(cell.engine, cell.loop, cell.engine_mode, cell.ghost_fallback)
    optimizer = sgd(cell.lr)
    dp = DPConfig(cell.dp.clip_norm, noise_multiplier) if cell.private else None
    step = make_step(engine, model.loss, optimizer, dp, donate=True,
                     expected_batch_size=batch_size if poisson else None, devices=cell.devices)
    keys = run_keys(cell.seed)

    def make_state():
        params = model.init(keys.init)
        return params, optimizer.init(params)

    def make_batch():
        data = synthetic(spec, keys.data, n=rows)
        # A Poisson step holds `rows` slots of which about `batch_size` are sampled.
        mask = (jnp.arange(rows) < batch_size).astype(jnp.float32) if poisson else None
        return data.x, data.y, mask

    abstract_state = jax.eval_shape(make_state)
    abstract_batch = jax.eval_shape(make_batch)
    result: dict[str, Any] = {"batch_size": batch_size, "rows": rows, "status": "ok",
                              "peak_bytes": None, "predicted_bytes": None, "peak_scope": None}
    if engine.jit:
        step.compile(*abstract_state, abstract_batch[0], abstract_batch[1], keys.noise,
                     abstract_batch[2])
        peaks = [predicted_peak(c) for c in step.executables]
        known = peaks and all(p is not None for p in peaks)
        result["predicted_bytes"] = max(peaks) if known else None
    elif predict_only:
        raise ValueError(f"memory.predict_only needs a jit engine (both, jit or ghost), not "
                         f"{engine.name}")
    if predict_only:
        return {**result, "wall_s": time.perf_counter() - start}
    if on_predicted is not None and result["predicted_bytes"] is not None:
        # Reported before the step runs: a try that then fails, even by dying, keeps its
        # prediction (the sizes that did not fit are where it is worth comparing).
        on_predicted(result["predicted_bytes"])

    safety = safety_limit(cap_bytes) if on_cpu and cap_bytes is not None else None

    def one_step():
        state = make_state()
        x, y, mask = make_batch()
        return jax.block_until_ready(step(*state, x, y, keys.noise, mask))

    if on_cpu:
        # A warm-up step first: the eager engines compile each primitive's kernel on first
        # use, and compiler memory is host memory, not what a device's memory would hold.
        with _data_limit(safety):
            one_step()
        gc.collect()
        baseline = _proc_status_bytes("VmRSS")
        with _data_limit(safety):
            peak_reset = _reset_peak_rss()
            one_step()
            high_water = _proc_status_bytes("VmHWM") if peak_reset else None
        if high_water is None and cap_bytes is not None:
            raise RuntimeError("cannot measure the step's own peak: /proc/self/clear_refs is not "
                               "writable here, so the CPU cap cannot be checked")
        result["peak_bytes"] = None if high_water is None else high_water - baseline
        result["peak_scope"] = "step" if peak_reset else None
        if cap_bytes is not None and result["peak_bytes"] is not None \
                and result["peak_bytes"] > cap_bytes:
            result.update(status="oom",
                          error=f"the step's peak {result['peak_bytes'] / (1 << 20):.0f} MiB "
                                f"exceeds the cap {cap_bytes / (1 << 20):.0f} MiB")
    else:
        used = jax.devices()[:cell.devices]

        def peaks() -> list[int]:
            return [int((d.memory_stats() or {}).get("peak_bytes_in_use", 0)) for d in used]

        before = peaks()
        one_step()
        after = peaks()
        if any(after):  # each device allocator's own, process-lifetime peak: the largest counts
            result["peak_bytes"] = max(after)
            result["peak_bytes_per_device"] = after
            # The lifetime peak is the step's only if the step raised it above what compiling
            # (autotuning) had left; otherwise it is an upper bound.
            raised = any(a > b for a, b in zip(after, before))
            result["peak_scope"] = "step" if raised else "process"
    result["wall_s"] = time.perf_counter() - start
    return result
