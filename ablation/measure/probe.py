"""The memory probe: the largest batch size whose DP-SGD step fits under a memory cap.

Search: grow the batch size geometrically from ``start`` until a size does not fit, then
bisect between the largest size that fit and the smallest that did not, down to
``resolution``. Each try runs one real step (any engine, private or not) in a fresh worker
process, so a failure cannot poison the next try:

* on a GPU the worker's device memory is capped (``XLA_PYTHON_CLIENT_MEM_FRACTION`` of the
  device, preallocated, so XLA's allocator refuses anything beyond it);
* on the CPU the worker's heap is capped (``RLIMIT_DATA``, which covers malloc and anonymous
  mappings), so a CPU probe ends in seconds instead of at the machine's full memory. The cap
  is set after the runtime has started and the step has been compiled, at the process's data
  size then plus ``limit_gb``: like a GPU's memory it holds the parameters, optimizer state,
  batch and the step's buffers, not Python, JAX or the compiler.

Out of memory is what the runtime raises (``RESOURCE_EXHAUSTED``, ``MemoryError``) or the
worker's death by signal under the cap (:mod:`ablation.sweep.failures`); any other failure stops the
probe with status ``error``. For jit engines every try also records the peak the compiled step
predicts (``compiled.memory_analysis()``), and ``predict_only`` searches on predictions alone,
compiling but running nothing.
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

from ablation.measure.settings import CellConfig, ProbeSettings


class CapExceeded(MemoryError):
    """A step that runs without the memory cap failed under it: out of memory."""


@dataclasses.dataclass
class Try:
    """One batch size tried: did it fit, and how much memory it took or was predicted to."""

    batch_size: int
    status: str  # ok | oom | error | timeout
    peak_bytes: int | None = None
    predicted_bytes: int | None = None
    error: str | None = None
    wall_s: float | None = None

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
def _data_cap(extra_bytes: int | None) -> Iterator[None]:
    """Cap the process' data size at its current size plus ``extra_bytes`` (None: no cap).

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


def try_batch(cell: CellConfig, noise_multiplier: float, batch_size: int, *,
              predict_only: bool = False, cap_bytes: int | None = None,
              on_predicted: Callable[[int], None] | None = None) -> dict[str, Any]:
    """One DP-SGD step of ``cell`` at ``batch_size`` (worker side); a :class:`Try` as a dict.

    Order matters for an honest CPU cap: the JAX runtime starts, the step is compiled on
    abstract shapes (jit engines) and run once to warm up (eager engines compile each
    primitive's kernel on first use), and only then is the cap set, at the process's current
    data size plus ``cap_bytes``; the parameters, optimizer state, batch and every buffer of
    the measured step are allocated under it, which is what a GPU's device memory would hold.
    The batch is synthetic with the dataset's shapes (the training set is not loaded: the
    probe measures the step). Exceptions propagate to the worker, which classifies them;
    ``on_predicted`` receives the compiled step's predicted peak before the step runs.
    """
    from ablation.core.dpsgd import DPConfig, make_step, sgd
    from ablation.core.engines import get_engine
    from ablation.data.samplers import synthetic
    from models import get_model

    start = time.perf_counter()
    jax.block_until_ready(jax.jit(lambda v: v + 1)(jax.numpy.zeros(1)))  # start the runtime
    device = jax.devices()[0]
    on_cpu = device.platform == "cpu"
    model = get_model(cell.model, unroll=cell.unroll)
    engine = get_engine(cell.engine, cell.loop)
    optimizer = sgd(cell.lr)
    dp = DPConfig(cell.dp.clip_norm, noise_multiplier) if cell.private else None
    step = make_step(engine, model.loss, optimizer, dp, donate=True)
    init_key, step_key = jax.random.split(jax.random.key(cell.seed))

    def make_state():
        params = model.init(init_key)
        return params, optimizer.init(params)

    spec = model.dataset
    abstract_state = jax.eval_shape(make_state)
    abstract_x = jax.ShapeDtypeStruct((batch_size, *spec.input_shape),
                                      jax.numpy.dtype(spec.input_dtype))
    abstract_y = jax.ShapeDtypeStruct((batch_size,), jax.numpy.int32)
    predicted = None
    if engine.jit:
        step.compile(*abstract_state, abstract_x, abstract_y, step_key)
        peaks = [predicted_peak(c) for c in step.executables]
        predicted = None if not peaks or any(p is None for p in peaks) else max(peaks)
    elif predict_only:
        raise ValueError(f"memory.predict_only needs a jit engine (both or jit), not {engine.name}")
    if predict_only:
        return {"batch_size": batch_size, "status": "ok", "predicted_bytes": predicted,
                "peak_bytes": None, "wall_s": time.perf_counter() - start}

    def measure() -> dict[str, Any]:
        if on_cpu:
            # A warm-up step first, under a looser safety cap: the eager engines compile each
            # primitive's kernel on first use, and compiler memory is host memory, not what a
            # GPU's device memory would hold. The measured step then reuses those kernels.
            with _data_cap(None if cap_bytes is None else 2 * cap_bytes + (1 << 30)):
                warm_x, warm_y = synthetic(spec, cell.seed, n=batch_size)[:2]
                jax.block_until_ready(step(*make_state(), warm_x, warm_y, step_key))
                del warm_x, warm_y
            gc.collect()
        baseline = _proc_status_bytes("VmRSS") if on_cpu else 0
        try:
            with _data_cap(cap_bytes if on_cpu else None):
                peak_reset = _reset_peak_rss() if on_cpu else False
                state = make_state()
                batch = synthetic(spec, cell.seed, n=batch_size)
                new_state = step(*state, batch.x, batch.y, step_key)
                jax.block_until_ready(new_state)
                peak_rss = _proc_status_bytes("VmHWM") if peak_reset else None
        except Exception as error:
            if on_cpu and cap_bytes is not None and not isinstance(error, MemoryError):
                # The same step has just run without the cap, so the cap is what broke it,
                # however the failing allocation reported itself (XLA status, INTERNAL error).
                from ablation.report.records import one_line
                raise CapExceeded(f"fails under the cap, runs without it: {one_line(error)}") \
                    from error
            raise
        stats = device.memory_stats()
        if stats and "peak_bytes_in_use" in stats:  # GPU: the device allocator's own peak
            peak = int(stats["peak_bytes_in_use"])
        elif peak_rss is not None:  # CPU: the process' peak resident memory above the baseline
            peak = peak_rss - baseline
        else:
            peak = None
        return {"batch_size": batch_size, "status": "ok", "peak_bytes": peak,
                "predicted_bytes": predicted, "baseline_bytes": baseline,
                "wall_s": time.perf_counter() - start}

    if on_predicted is not None and predicted is not None:
        # Reported before the step runs: a try that then fails, even by dying under the cap,
        # keeps its prediction (the sizes that did not fit are where it is worth comparing).
        on_predicted(predicted)
    return measure()
