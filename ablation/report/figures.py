"""The paper's figures from result frames (seaborn), and ``python -m ablation.figures``.

Each figure function takes a frame of :mod:`ablation.report.analysis` and returns a matplotlib
``Figure``; one palette and one engine order everywhere; axis labels carry units. Cells a
figure is asked for and the frame lacks raise :class:`ablation.report.analysis.MissingCells`.

Each figure shows one family of records (one sweep's machine, code and settings; see
:mod:`ablation.report.analysis`) and refuses a frame that mixes several.
``python -m ablation.figures outputs --out outputs/figures`` draws every figure the results
under ``outputs/`` support, one folder per device and family, as PNG and PDF, running no
experiment.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path
from typing import Sequence

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from ablation.report import analysis
from ablation.report.analysis import MissingCells, require

SYSTEM_ORDER = ("both", "jit", "jit[unrolled]", "jit[scan]", "vmap", "none", "ghost",
                "ghost[two_pass]", "jax_privacy", "opacus", "opacus[ghost]", "opacus[functorch]",
                "opacus[ew]", "pytorch", "tfp", "tfp[xla]", "tfp[loop]", "tfp[loop,xla]", "keras",
                "keras[xla]", "backpack", "pyvacy")
_colors = sns.color_palette("colorblind", 10)
_more = sns.color_palette("dark", 10)
PALETTE = {"both": _colors[0], "jit": _colors[1], "jit[unrolled]": _colors[1],
           "jit[scan]": _colors[1], "vmap": _colors[2], "none": _colors[7],
           "ghost": _colors[8], "ghost[two_pass]": _more[8], "jax_privacy": _colors[9],
           "opacus": _colors[3], "opacus[ghost]": _colors[4], "opacus[functorch]": _colors[5],
           "opacus[ew]": _colors[6], "pytorch": _more[3], "tfp": _more[0], "tfp[xla]": _more[5],
           "tfp[loop]": _more[1], "tfp[loop,xla]": _more[6], "keras": _more[7],
           "keras[xla]": _more[9], "backpack": _more[2], "pyvacy": _more[4]}
ENGINE_NAMES = {"both": "jit + vmap", "jit": "jit only", "vmap": "vmap only", "none": "neither",
                "ghost": "ghost (jit + layer rules)", "opacus": "Opacus", "pytorch": "PyTorch"}


def _system(frame: pd.DataFrame) -> pd.Series:
    """The bar label: the engine, or the framework's plain step for non-private rows that
    engines share (:func:`ablation.report.analysis.system_of`)."""
    return frame["system"] if "system" in frame else frame.apply(analysis.system_of, axis=1)


def _order(present: Sequence[str]) -> list[str]:
    known = [s for s in SYSTEM_ORDER if s in set(present)]
    return known + sorted(set(present) - set(known))


def _label_bars(ax, fmt: str = "{:.3g}") -> None:
    for container in ax.containers:
        labels = [fmt.format(v) if v == v and v is not None else "" for v in container.datavalues]
        ax.bar_label(container, labels=labels, fontsize=7, padding=1, rotation=90)


def _times(value: float) -> str:
    """``×1.77``, ``×31``, ``×1,640``: how many times slower than jit + vmap."""
    return f"×{value:,.0f}" if value >= 100 else f"×{value:.3g}"


def _headroom(ax) -> None:
    """Room above the tallest bar of a log axis for its rotated label."""
    low, high = ax.get_ylim()
    ax.set_ylim(low, high * 6)


def _device_title(frame: pd.DataFrame) -> str:
    devices = sorted(frame["device"].unique()) if "device" in frame and len(frame) else []
    return f" — {', '.join(devices)}" if devices else ""


def _epoch_axis(frame: pd.DataFrame) -> str:
    """The epoch-time axis label, saying whether the epochs were run or estimated."""
    estimated = frame.get("epoch_estimated", pd.Series(True, index=frame.index))
    estimated = estimated.fillna(True).astype(bool)
    if estimated.all():
        how = "est. from throughput"
    elif not estimated.any():
        how = "full epochs run"
    else:
        how = "some est. from throughput"
    return f"epoch time (s, log; {how})"


def runtimes(frame: pd.DataFrame, model: str, *, batch_sizes: Sequence[int] | None = None,
             systems: Sequence[str] | None = None) -> plt.Figure:
    """Median epoch time per engine/framework, hue = batch size; private and non-private panels.

    The paper's Figures 1–11 for one model. ``batch_sizes``/``systems`` pin the cells drawn
    (each must exist); by default every cell of the model in ``frame`` is drawn.
    """
    data = analysis.one_family(frame)
    data = data[data["model"] == model].copy()
    if data.empty:
        raise MissingCells(f"no ok result for model {model}")
    data["system"] = _system(data)
    if batch_sizes is not None or systems is not None:
        require(data, system=systems or sorted(data["system"].unique()),
                batch_size=batch_sizes or sorted(data["batch_size"].unique()))
        data = data[data["system"].isin(systems or data["system"].unique())
                    & data["batch_size"].isin(batch_sizes or data["batch_size"].unique())]
    panels = [p for p in (True, False) if (data["private"] == p).any()]
    # Each panel as wide as its bars need (the private one holds every framework's rows).
    widths = [max(4.0, 0.75 * data[data["private"] == p]["system"].nunique()) for p in panels]
    fig, axes = plt.subplots(1, len(panels), figsize=(sum(widths) + 1.5, 4.6), squeeze=False,
                             gridspec_kw={"width_ratios": widths})
    hue_order = sorted(data["batch_size"].unique())
    # One colour per batch size in both panels, also where a panel lacks some sizes.
    colours = dict(zip(hue_order, sns.color_palette("viridis", len(hue_order))))
    for ax, private in zip(axes[0], panels):
        part = data[data["private"] == private]
        present = [b for b in hue_order if (part["batch_size"] == b).any()]
        sns.barplot(part, x="system", y="median_epoch_s", hue="batch_size", ax=ax,
                    order=_order(part["system"].unique()), hue_order=present,
                    palette={b: colours[b] for b in present}, errorbar=None)
        ax.set_yscale("log")
        ax.set_title(f"{model}, {'private (DP-SGD)' if private else 'non-private (SGD)'}")
        ax.set_xlabel("engine / framework")
        ax.tick_params(axis="x", labelrotation=40)
        for label in ax.get_xticklabels():
            label.set_horizontalalignment("right")
        ax.set_ylabel(_epoch_axis(part))
        ax.legend(title="batch size", fontsize=8)
        _label_bars(ax)
        _headroom(ax)
    fig.suptitle(f"Runtime per epoch{_device_title(data)}", fontsize=10)
    fig.tight_layout()
    return fig


def ablation(frame: pd.DataFrame, *, batch_size: int, models: Sequence[str] | None = None,
             private: bool = True) -> plt.Figure:
    """The paper's §4.1: epoch time of the four engines per model at one batch size (log)."""
    frame = analysis.one_family(frame)
    table = analysis.ablation_speedups(frame, batch_size=batch_size, private=private,
                                       models=models)
    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * table["model"].nunique(), 4.2))
    engines = ["both", "jit", "vmap", "none"]
    order = analysis.models_in(table)
    sns.barplot(table, x="model", y="median_epoch_s", hue="engine_label", hue_order=engines,
                palette=PALETTE, ax=ax, errorbar=None, order=order)
    ax.set_yscale("log")
    for container, engine in zip(ax.containers, engines):
        speed = table[table["engine_label"] == engine].set_index("model")["both_speedup"]
        ax.bar_label(container, labels=[_times(speed[m]) if m in speed else "" for m in order],
                     fontsize=7, padding=1, rotation=90)
    _headroom(ax)
    handles, _ = ax.get_legend_handles_labels()
    ax.legend(handles, [ENGINE_NAMES[e] for e in engines], title="engine", fontsize=8)
    ax.set_xlabel("model")
    ax.set_ylabel(_epoch_axis(frame[frame["batch_size"] == batch_size]))
    ax.set_title(f"jit × vmap ablation, {'private' if private else 'non-private'}, batch "
                 f"{batch_size}{_device_title(frame)}\n(labels: times slower than jit + vmap)",
                 fontsize=9)
    fig.tight_layout()
    return fig


def decomposition(frame: pd.DataFrame, *, batch_size: int, models: Sequence[str] | None = None,
                  private: bool = True) -> plt.Figure:
    """The answer to the question: how many times faster each ingredient makes a step, per
    model (log scale): jit with and without vmap, vmap with and without jit. A dot marks
    the interaction (1: the two multiply)."""
    frame = analysis.one_family(frame)
    table = analysis.decomposition(frame, batch_size=batch_size, private=private, models=models)
    names = [name for name, _, _ in analysis.FACTORS]
    long = table.melt(id_vars="model", value_vars=names, var_name="factor", value_name="x")
    order = analysis.models_in(table)
    fig, ax = plt.subplots(figsize=(2.0 + 1.8 * len(order), 4.4))
    colours = [PALETTE["jit"], sns.desaturate(PALETTE["jit"], 0.4), PALETTE["vmap"],
               sns.desaturate(PALETTE["vmap"], 0.4)]
    sns.barplot(long, x="model", y="x", hue="factor", order=order, hue_order=names,
                palette=dict(zip(names, colours)), ax=ax, errorbar=None)
    ax.set_yscale("log")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    _label_bars(ax, "{:.3g}")
    twin = ax.twinx()
    twin.plot(range(len(order)), table.set_index("model").loc[order, "interaction"], "kD",
              label="interaction (right axis)")
    twin.set_yscale("log")
    twin.set_ylabel("interaction (1 = the factors multiply)")
    _headroom(ax)
    ax.set_xlabel("model")
    ax.set_ylabel("times faster with the ingredient (log scale)")
    handles, labels = ax.get_legend_handles_labels()
    h2, l2 = twin.get_legend_handles_labels()
    ax.legend(handles + h2, labels + l2, fontsize=7, loc="upper left")
    ax.set_title(f"What jit and vmap each contribute, {'private' if private else 'non-private'}, "
                 f"batch {batch_size}{_device_title(frame)}", fontsize=9)
    fig.tight_layout()
    return fig


def compile_times(frame: pd.DataFrame, *, models: Sequence[str] | None = None) -> plt.Figure:
    """Compile seconds against batch size per engine, one panel per model."""
    table = analysis.compile_times(analysis.one_family(frame))
    if models is not None:
        require(table, model=models)
        table = table[table["model"].isin(models)]
    if table.empty:
        raise MissingCells("no record with a compile time (no jit engine ran)")
    model_list = analysis.models_in(table)
    cols = min(3, len(model_list))
    rows = math.ceil(len(model_list) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat[len(model_list):]:
        ax.set_visible(False)
    for ax, model in zip(axes.flat, model_list):
        part = table[table["model"] == model]
        sns.lineplot(part, x="batch_size", y="compile_s", hue="engine_label",
                     style="private", markers=True, palette=PALETTE, ax=ax,
                     hue_order=_order(part["engine_label"].unique()))
        ax.set_xscale("log", base=2)
        ax.set_title(model)
        ax.set_xlabel("batch size")
        ax.set_ylabel("compile time (s)")
        ax.legend(fontsize=7)
    fig.suptitle(f"Compilation time (what epoch medians hide){_device_title(table)}", fontsize=10)
    fig.tight_layout()
    return fig


def max_batch(memory: pd.DataFrame, *, models: Sequence[str] | None = None,
              engines: Sequence[str] | None = None) -> plt.Figure:
    """The paper's §4.2: the largest batch that fits per model, with jit and without.

    One family, so one cap. Bars of predictions (``memory.predict_only``: compiled, never run)
    are hatched and labelled "(predicted)"; measured bars are plain.
    """
    table = analysis.max_batch_sizes(analysis.one_family(memory))
    if models is not None or engines is not None:
        require(table, model=models or sorted(table["model"].unique()),
                engine_label=engines or sorted(table["engine_label"].unique()))
        table = table[table["model"].isin(models or table["model"].unique())
                      & table["engine_label"].isin(engines or table["engine_label"].unique())]
    if table.empty:
        raise MissingCells("no ok memory record")
    table = table.copy()
    measured = table.get("measured", pd.Series(True, index=table.index)).astype(bool)
    table["bar"] = [e if m else f"{e} (predicted)" for e, m in zip(table["engine_label"], measured)]
    order = analysis.models_in(table)
    bars = _order(table["engine_label"].unique())
    hue_order = [b for e in bars for b in (e, f"{e} (predicted)") if b in set(table["bar"])]
    palette = {b: PALETTE.get(b.split(" ")[0], "grey") for b in hue_order}
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(order), 4.2))
    sns.barplot(table, x="model", y="max_batch_size", hue="bar", order=order,
                hue_order=hue_order, palette=palette, ax=ax, errorbar=None)
    for container, bar in zip(ax.containers, hue_order):
        if bar.endswith("(predicted)"):
            for patch in container:
                patch.set_hatch("//")
                patch.set_alpha(0.6)
    ax.set_yscale("log", base=2)
    _label_bars(ax, "{:.0f}")
    _headroom(ax)
    caps = sorted({f"{g * 1024:.0f} MiB" if g < 1 else f"{g:.3g} GiB"
                   for g in table["limit_gib"].dropna()})
    ax.set_title(f"Largest batch that fits (cap {', '.join(caps) or 'none'})"
                 f"{_device_title(table)}", fontsize=9)
    ax.set_xlabel("model")
    ax.set_ylabel("max batch size (examples, log scale)")
    ax.legend(title="engine", fontsize=8)
    fig.tight_layout()
    return fig


def overhead(frame: pd.DataFrame, *, engine: str = "both",
             models: Sequence[str] | None = None) -> plt.Figure:
    """Privacy overhead: private ÷ non-private epoch time per model and batch size."""
    table = analysis.privacy_overhead(analysis.one_family(frame))
    table = table[table["engine_label"] == engine]
    if models is not None:
        require(table, model=models)
        table = table[table["model"].isin(models)]
    if table.empty:
        raise MissingCells(f"no private/non-private pair for engine {engine}")
    order = analysis.models_in(table)
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(order), 4.2))
    sns.barplot(table, x="model", y="overhead", hue="batch_size", order=order, ax=ax,
                hue_order=sorted(table["batch_size"].unique()), palette="viridis", errorbar=None)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    _label_bars(ax, "{:.2g}")
    ax.set_xlabel("model")
    ax.set_ylabel("private ÷ non-private epoch time (×)")
    ax.set_title(f"Cost of privacy, engine {engine}{_device_title(table)}", fontsize=9)
    ax.legend(title="batch size", fontsize=8)
    fig.tight_layout()
    return fig


def save(fig: plt.Figure, folder: str | Path, name: str) -> list[Path]:
    """Write ``name.png`` and ``name.pdf`` into ``folder``; closes the figure."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for suffix in ("png", "pdf"):
        path = folder / f"{name}.{suffix}"
        fig.savefig(path, dpi=150, bbox_inches="tight")
        paths.append(path)
    plt.close(fig)
    return paths


# ---------------------------------------------------------------------------------------------


def best_ablation_batch(frame: pd.DataFrame, prefer: int = 128) -> tuple[int, list[str]] | None:
    """The batch size at which most models have all four engines (private), and those models."""
    private = frame[frame["private"] == True]  # noqa: E712
    best = None
    for batch, part in private.groupby("batch_size"):
        models = [m for m, g in part.groupby("model")
                  if {"both", "jit", "vmap", "none"} <= set(g["engine_label"])]
        key = (len(models), batch == prefer, batch)
        if models and (best is None or key > best[0]):
            best = (key, int(batch), sorted(models, key=analysis._model_key))
    return None if best is None else (best[1], best[2])


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def draw_all(roots: Sequence[str | Path], out: str | Path) -> list[Path]:
    """Every figure the results under ``roots`` support, one folder per device and family
    (``<out>/<device>/<experiment>-<family hash>/``)."""
    timing, memory = analysis.load(list(roots))
    written: list[Path] = []
    for device, family, t in analysis.groups(timing):
        folder = Path(out) / slug(device) / family
        jobs = [(f"runtimes_{model}", lambda model=model: runtimes(t, model))
                for model in analysis.models_in(t)]
        choice = best_ablation_batch(t)
        if choice:
            jobs.append(("ablation", lambda: ablation(t, batch_size=choice[0], models=choice[1])))
            jobs.append(("decomposition",
                         lambda: decomposition(t, batch_size=choice[0], models=choice[1])))
        if t["compile_s"].notna().any():
            jobs.append(("compile_times", lambda: compile_times(t)))
        if not analysis.privacy_overhead(t).query("engine_label == 'both'").empty:
            jobs.append(("privacy_overhead", lambda: overhead(t)))
        written += _save_all(jobs, folder, device, family)
    for device, family, m in analysis.groups(memory):
        folder = Path(out) / slug(device) / family
        written += _save_all([("max_batch", lambda: max_batch(m))], folder, device, family)
    return written


def _save_all(jobs, folder: Path, device: str, family: str) -> list[Path]:
    written = []
    for name, draw in jobs:
        written += save(draw(), folder, name)
    print(f"{device} / {family}: {len(jobs)} figures in {folder}")
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Draw every figure from result records.")
    parser.add_argument("roots", nargs="*", default=["outputs"],
                        help="folders searched for result.json (default: outputs)")
    parser.add_argument("--out", default="outputs/figures", help="where figures go")
    args = parser.parse_args(argv)
    try:
        written = draw_all(args.roots, args.out)
    except analysis.NoRecords as error:
        print(f"error: {error}: run `python -m ablation.run` first", file=sys.stderr)
        return 1
    if not written:
        print("no figure to draw: the records hold no ok cell", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
