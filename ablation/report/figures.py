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
from typing import Any, Sequence

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from ablation.report import analysis, records
from ablation.report.analysis import MissingCells, require
from ablation.report.labels import format_ratio, significant

SYSTEM_ORDER = ("both", "jit", "jit[unrolled]", "jit[scan]", "vmap", "none", "ghost",
                "ghost[two_pass]", "jax_privacy", "opacus", "opacus[ghost]", "opacus[functorch]",
                "opacus[ew]", "pytorch", "tfp", "tfp[xla]", "tfp[loop]", "tfp[loop,xla]",
                "tfp[fast]", "tfp[fast,xla]", "keras", "keras[xla]", "backpack", "pyvacy")
_colors = sns.color_palette("colorblind", 10)
_more = sns.color_palette("dark", 10)
PALETTE = {"both": _colors[0], "jit": _colors[1], "jit[unrolled]": _colors[1],
           "jit[scan]": _colors[1], "vmap": _colors[2], "none": _colors[7],
           "ghost": _colors[8], "ghost[two_pass]": _more[8], "jax_privacy": _colors[9],
           "opacus": _colors[3], "opacus[ghost]": _colors[4], "opacus[functorch]": _colors[5],
           "opacus[ew]": _colors[6], "pytorch": _more[3], "tfp": _more[0], "tfp[xla]": _more[5],
           "tfp[loop]": _more[1], "tfp[loop,xla]": _more[6], "tfp[fast]": _more[8],
           "tfp[fast,xla]": _more[8], "keras": _more[7],
           "keras[xla]": _more[9], "backpack": _more[2], "pyvacy": _more[4]}
GREY = (0.6, 0.6, 0.6)


def palette(labels: Sequence[str]) -> dict[str, tuple]:
    """A colour for every label drawn: its own, else its engine's (``both[2 devices]`` is
    ``both``'s, ``ghost (predicted)`` is ``ghost``'s), else grey: never a missing key."""
    def colour(label: str) -> tuple:
        base = str(label).split(" ")[0]
        return PALETTE.get(label) or PALETTE.get(base) or PALETTE.get(base.split("[")[0], GREY)
    return {label: colour(label) for label in labels}


#: Drawn with each mark: the record(s) behind it, so a reader can check a bar against a file.
_SOURCE = "path"


def marks(data: pd.DataFrame, keys: Sequence[str], values: Sequence[str],
          what: str) -> pd.DataFrame:
    """The rows a figure draws, exactly one per mark (``keys``: its axis, hue and panel).

    seaborn would average rows that share a mark; two records of one mark differ in some
    setting that is on no axis and in no legend, so the figure is refused, naming it.
    The returned table (the marks' keys, their values and the record behind each) is what
    :func:`save` writes beside the figure as CSV.
    """
    keys, values = list(keys), list(values)
    shared = data.duplicated(subset=keys, keep=False)
    if shared.any():
        clash = data[shared]
        varying = [c for c in clash.columns if c not in (*keys, *values, _SOURCE)
                   and clash.groupby(keys)[c].nunique(dropna=False).max() > 1
                   and not c.startswith("_")]
        raise ValueError(f"{what}: {int(shared.sum())} records would be averaged into shared "
                         f"marks ({'/'.join(keys)}); they differ in "
                         f"{', '.join(varying) or 'no recorded setting'}: draw them apart")
    columns = [c for c in (*keys, *values, _SOURCE) if c in data]
    return data[columns].reset_index(drop=True)


def _with_marks(fig: plt.Figure, table: pd.DataFrame) -> plt.Figure:
    fig.ablation_marks = table  # written beside the figure by save()
    return fig


ENGINE_NAMES = {"both": "jit + vmap", "jit": "jit only", "vmap": "vmap only", "none": "neither",
                "ghost": "ghost (jit + layer rules)", "opacus": "Opacus", "pytorch": "PyTorch"}


def _system(frame: pd.DataFrame) -> pd.Series:
    """The bar label: the engine, or the framework's plain step for non-private rows that
    engines share (:func:`ablation.report.analysis.system_of`)."""
    return frame["system"] if "system" in frame else frame.apply(analysis.system_of, axis=1)


def _order(present: Sequence[str]) -> list[str]:
    known = [s for s in SYSTEM_ORDER if s in set(present)]
    return known + sorted(set(present) - set(known))


def _label_bars(ax, fmt: str | None = None) -> None:
    """Each bar's value above it: three significant figures, never scientific notation."""
    for container in ax.containers:
        labels = [("" if v is None or v != v else
                   fmt.format(v) if fmt else significant(float(v), 3))
                  for v in container.datavalues]
        ax.bar_label(container, labels=labels, fontsize=7, padding=1, rotation=90)


def _headroom(ax) -> None:
    """Room above the tallest bar for its rotated label (a factor on a log axis, a fraction
    of the span on a linear one)."""
    low, high = ax.get_ylim()
    ax.set_ylim(low, high * 6 if ax.get_yscale() == "log" else high + 0.18 * (high - low))


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
             systems: Sequence[str] | None = None,
             unmeasured: pd.DataFrame | None = None) -> plt.Figure:
    """Median epoch time per engine/framework, hue = batch size; the private panel above the
    non-private one.

    The paper's Figures 1–11 for one model. ``batch_sizes``/``systems`` pin the cells drawn
    (each must exist); by default every cell of the model in ``frame`` is drawn. The cells of
    ``unmeasured`` (:func:`ablation.report.analysis.unmeasured_cells`) are marked where their
    bar would stand (``refused``, ``out of memory``, ...) and listed in the marks' CSV.
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
    table = marks(data, ["private", "system", "batch_size"], ["median_epoch_s", "epoch_estimated"],
                  f"runtimes of {model}")
    missing = _unmeasured_of(unmeasured, data, model, systems, batch_sizes)
    if len(missing):
        table = pd.concat([table, missing[["private", "system", "batch_size", "outcome", "path"]]],
                          ignore_index=True)
    panels = [p for p in (True, False) if (data["private"] == p).any()]
    # Panels stacked, each as wide as its bars need: readable labels at every width.
    width = max(6.0, 0.62 * max(data[data["private"] == p]["system"].nunique() for p in panels)
                * max(1, min(3, data["batch_size"].nunique())) / 2 + 2.0)
    fig, axes = plt.subplots(len(panels), 1, figsize=(width, 3.9 * len(panels)), squeeze=False)
    hue_order = sorted(data["batch_size"].unique())
    # One colour per batch size in both panels, also where a panel lacks some sizes.
    colours = dict(zip(hue_order, sns.color_palette("viridis", len(hue_order))))
    for ax, private in zip(axes[:, 0], panels):
        part = data[data["private"] == private]
        gone = missing[missing["private"] == private]
        present = [b for b in hue_order if (part["batch_size"] == b).any()]
        order = _order([*part["system"].unique(), *gone["system"].unique()])
        sns.barplot(part, x="system", y="median_epoch_s", hue="batch_size", ax=ax,
                    order=order, hue_order=present,
                    palette={b: colours[b] for b in present}, errorbar=None)
        ax.set_yscale("log")
        ax.set_title(f"{model}, {'private (DP-SGD)' if private else 'non-private (SGD)'}",
                     fontsize=10)
        ax.set_xlabel("engine / framework")
        ax.tick_params(axis="x", labelrotation=30, labelsize=9)
        for label in ax.get_xticklabels():
            label.set_horizontalalignment("right")
        ax.set_ylabel(_epoch_axis(part))
        ax.legend(title="batch size", fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        _label_bars(ax)
        _mark_unmeasured(ax, gone, order, present)
        _headroom(ax)
    fig.suptitle(f"Runtime per epoch{_device_title(data)}", fontsize=10)
    fig.tight_layout()
    return _with_marks(fig, table)


def _unmeasured_of(unmeasured: pd.DataFrame | None, data: pd.DataFrame, model: str,
                   systems: Sequence[str] | None,
                   batch_sizes: Sequence[int] | None) -> pd.DataFrame:
    """The unmeasured cells of ``data``'s family and ``model`` among the pinned ones."""
    columns = ["private", "system", "batch_size", "outcome", "path"]
    if unmeasured is None or unmeasured.empty:
        return pd.DataFrame(columns=columns)
    gone = unmeasured[unmeasured["family"].isin(data["family"].unique())
                      & (unmeasured["model"] == model)].copy()
    gone["system"] = _system(gone) if len(gone) else []
    if systems is not None:
        gone = gone[gone["system"].isin(systems)]
    if batch_sizes is not None:
        gone = gone[gone["batch_size"].isin(batch_sizes)]
    return gone[columns].reset_index(drop=True)


def _mark_unmeasured(ax, gone: pd.DataFrame, order: Sequence[str],
                     present: Sequence[int]) -> None:
    """A rotated word (``refused``, ``out of memory``...) at the foot of each missing bar's
    slot (seaborn dodges ``len(present)`` hues over a width of 0.8), or of its engine's slot
    when no drawn bar has its batch size."""
    from matplotlib.transforms import blended_transform_factory
    foot = blended_transform_factory(ax.transData, ax.transAxes)
    for _, row in gone.iterrows():
        x = order.index(row["system"])
        if row["batch_size"] in present:
            x += -0.4 + 0.8 * (list(present).index(row["batch_size"]) + 0.5) / len(present)
            text = row["outcome"]
        else:
            text = f"B={row['batch_size']}: {row['outcome']}"
        ax.text(x, 0.02, text, transform=foot, rotation=90, fontsize=7, ha="center",
                va="bottom", color="firebrick")


def ablation(frame: pd.DataFrame, *, batch_size: int, models: Sequence[str] | None = None,
             private: bool = True) -> plt.Figure:
    """The paper's §4.1: epoch time of the four engines per model at one batch size (log)."""
    frame = analysis.one_family(frame)
    table = analysis.ablation_speedups(frame, batch_size=batch_size, private=private,
                                       models=models)
    drawn = marks(table, ["model", "engine_label"], ["median_epoch_s", "both_speedup"],
                  "ablation")
    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * table["model"].nunique(), 4.2))
    engines = ["both", "jit", "vmap", "none"]
    order = analysis.models_in(table)
    sns.barplot(table, x="model", y="median_epoch_s", hue="engine_label", hue_order=engines,
                palette=palette(engines), ax=ax, errorbar=None, order=order)
    ax.set_yscale("log")
    for container, engine in zip(ax.containers, engines):
        rows = table[table["engine_label"] == engine].set_index("model")
        ax.bar_label(container, labels=[format_ratio(rows.loc[m, "both_speedup"],
                                                     rows.loc[m, "ratio_digits"])
                                        if m in rows.index else "" for m in order],
                     fontsize=7, padding=1, rotation=90)
    _headroom(ax)
    handles, _ = ax.get_legend_handles_labels()
    ax.legend(handles, [ENGINE_NAMES[e] for e in engines], title="engine", fontsize=8,
              loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_xlabel("model")
    ax.set_ylabel(_epoch_axis(frame[frame["batch_size"] == batch_size]))
    ax.set_title(f"jit × vmap ablation, {'private' if private else 'non-private'}, batch "
                 f"{batch_size}{_device_title(frame)}\n(labels: times slower than jit + vmap)",
                 fontsize=9)
    fig.tight_layout()
    return _with_marks(fig, drawn)


def decomposition(frame: pd.DataFrame, *, batch_size: int, models: Sequence[str] | None = None,
                  private: bool = True) -> plt.Figure:
    """The answer to the question: how many times faster each ingredient makes a step, per
    model (log scale): jit with and without vmap, vmap with and without jit. A diamond marks
    the interaction (1: the two multiply)."""
    frame = analysis.one_family(frame)
    table = analysis.decomposition(frame, batch_size=batch_size, private=private, models=models)
    names = [name for name, _, _ in analysis.FACTORS]
    long = table.melt(id_vars="model", value_vars=names, var_name="factor", value_name="x")
    # Each factor is a ratio of two cells, the interaction of all four: name their records.
    cells = analysis.ablation_speedups(frame, batch_size=batch_size, private=private,
                                       models=models)
    paths = {(m, e): p for m, e, p in zip(cells["model"], cells["engine_label"],
                                          cells.get("path", [None] * len(cells)))}
    factor_cells = {name: (slow, fast) for name, slow, fast in analysis.FACTORS}
    long["path"] = [f"{paths.get((m, factor_cells[f][0]))}; {paths.get((m, factor_cells[f][1]))}"
                    for m, f in zip(long["model"], long["factor"])]
    interaction = table[["model", "interaction"]].assign(factor="interaction").rename(
        columns={"interaction": "x"})
    interaction["path"] = ["; ".join(str(paths.get((m, e))) for e in ("both", "jit", "vmap",
                                                                      "none"))
                           for m in interaction["model"]]
    drawn = pd.concat([marks(long, ["model", "factor"], ["x"], "decomposition"), interaction],
                      ignore_index=True)
    order = analysis.models_in(table)
    fig, ax = plt.subplots(figsize=(2.0 + 1.8 * len(order), 4.4))
    colours = [PALETTE["jit"], sns.desaturate(PALETTE["jit"], 0.4), PALETTE["vmap"],
               sns.desaturate(PALETTE["vmap"], 0.4)]
    sns.barplot(long, x="model", y="x", hue="factor", order=order, hue_order=names,
                palette=dict(zip(names, colours)), ax=ax, errorbar=None)
    ax.set_yscale("log")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    _label_bars(ax)
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
    # Outside the axes: inside, it covered a marker.
    ax.legend(handles + h2, labels + l2, fontsize=7, loc="upper left",
              bbox_to_anchor=(1.12, 1.0))
    ax.set_title(f"What jit and vmap each contribute, {'private' if private else 'non-private'}, "
                 f"batch {batch_size}{_device_title(frame)}", fontsize=9)
    fig.tight_layout()
    return _with_marks(fig, drawn)


def compile_times(frame: pd.DataFrame, *, models: Sequence[str] | None = None) -> plt.Figure:
    """Compile seconds against batch size per engine, one panel per model."""
    table = analysis.compile_times(analysis.one_family(frame))
    if models is not None:
        require(table, model=models)
        table = table[table["model"].isin(models)]
    if table.empty:
        raise MissingCells("no record with a compile time (no jit engine ran)")
    drawn = marks(table, ["model", "engine_label", "private", "batch_size"], ["compile_s"],
                  "compile times")
    model_list = analysis.models_in(table)
    cols = min(3, len(model_list))
    rows = math.ceil(len(model_list) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat[len(model_list):]:
        ax.set_visible(False)
    for ax, model in zip(axes.flat, model_list):
        part = table[table["model"] == model]
        engines = _order(part["engine_label"].unique())
        sns.lineplot(part, x="batch_size", y="compile_s", hue="engine_label",
                     style="private", markers=True, palette=palette(engines), ax=ax,
                     hue_order=engines)
        ax.set_xscale("log", base=2)
        ax.set_title(model)
        ax.set_xlabel("batch size")
        ax.set_ylabel("compile time (s)")
        ax.legend(fontsize=7)
    fig.suptitle(f"Compilation time (what epoch medians hide){_device_title(table)}", fontsize=10)
    fig.tight_layout()
    return _with_marks(fig, drawn)


def max_batch(memory: pd.DataFrame, *, models: Sequence[str] | None = None,
              engines: Sequence[str] | None = None) -> plt.Figure:
    """The paper's §4.2: the largest batch that fits per model, with jit and without; private
    and non-private records in panels of their own (never one bar).

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
    drawn = marks(table, ["private", "model", "bar"], ["max_batch_size", "limit_gib"],
                  "largest batch")
    panels = [p for p in (True, False) if (table["private"] == p).any()]
    order = analysis.models_in(table)
    bars = _order(table["engine_label"].unique())
    fig, axes = plt.subplots(len(panels), 1, figsize=(2.4 + 1.5 * len(order), 3.9 * len(panels)),
                             squeeze=False)
    for ax, private in zip(axes[:, 0], panels):
        part = table[table["private"] == private]
        hue_order = [b for e in bars for b in (e, f"{e} (predicted)") if b in set(part["bar"])]
        sns.barplot(part, x="model", y="max_batch_size", hue="bar", order=order,
                    hue_order=hue_order, palette=palette(hue_order), ax=ax, errorbar=None)
        for container, bar in zip(ax.containers, hue_order):
            if bar.endswith("(predicted)"):
                for patch in container:
                    patch.set_hatch("//")
                    patch.set_alpha(0.6)
        ax.set_yscale("log", base=2)
        _label_bars(ax, "{:,.0f}")
        _headroom(ax)
        ax.set_title(f"{'private (DP-SGD)' if private else 'non-private (SGD)'}", fontsize=9)
        ax.set_xlabel("model")
        ax.set_ylabel("max batch size (examples, log)")
        ax.legend(title="engine", fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    caps = sorted({f"{g * 1024:.0f} MiB" if g < 1 else f"{g:.3g} GiB"
                   for g in table["limit_gib"].dropna()})
    fig.suptitle(f"Largest batch that fits (cap {', '.join(caps) or 'none'})"
                 f"{_device_title(table)}", fontsize=10)
    fig.tight_layout()
    return _with_marks(fig, drawn)


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
    drawn = marks(table, ["model", "batch_size"], ["private_s", "nonprivate_s", "overhead"],
                  "privacy overhead")
    order = analysis.models_in(table)
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(order), 4.2))
    sns.barplot(table, x="model", y="overhead", hue="batch_size", order=order, ax=ax,
                hue_order=sorted(table["batch_size"].unique()), palette="viridis", errorbar=None)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    for container in ax.containers:
        ax.bar_label(container, labels=[format_ratio(v) for v in container.datavalues],
                     fontsize=7, padding=1, rotation=90)
    _headroom(ax)
    ax.set_xlabel("model")
    ax.set_ylabel("private ÷ non-private epoch time (×)")
    ax.set_title(f"Cost of privacy, engine {engine}{_device_title(table)}", fontsize=9)
    ax.legend(title="batch size", fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return _with_marks(fig, drawn)


def scaling(frame: pd.DataFrame) -> plt.Figure:
    """Throughput over processes (``experiment=scaling``): examples per second ÷ the
    one-process cell's, per model, for each system and for strong (fixed global batch) and
    weak (fixed per-process batch) scaling; the dashed line is perfect scaling."""
    from ablation.report.scaling import scaling_table
    table = scaling_table(analysis.one_family(frame))
    if table.empty:
        raise MissingCells("no cell of more than one process")
    drawn = marks(table, ["model", "system", "scaling", "processes"],
                  ["batch", "ms/step", "examples/s", "× 1 process"], "scaling")
    models = analysis.models_in(table)
    fig, axes = plt.subplots(1, len(models), figsize=(0.6 + 3.4 * len(models), 3.6),
                             squeeze=False, sharey=True)
    top = max(table["processes"])
    for ax, model in zip(axes[0], models):
        part = table[table["model"] == model]
        sns.lineplot(part, x="processes", y="× 1 process", hue="system", style="scaling",
                     markers=True, ax=ax, errorbar=None,
                     style_order=[s for s in ("strong", "weak") if s in set(part["scaling"])])
        ax.plot([1, top], [1, top], color="grey", lw=0.8, ls="--", label="perfect")
        ax.set_xticks(sorted(table["processes"].unique()))
        ax.set_title(model, fontsize=9)
        ax.set_xlabel("processes")
        ax.set_ylabel("examples/s ÷ 1 process (×)")
        if ax is not axes[0][-1] and ax.get_legend():
            ax.get_legend().remove()
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(f"Scaling over processes{_device_title(frame)}", fontsize=10)
    fig.tight_layout()
    return _with_marks(fig, drawn)


def audit(table: pd.DataFrame) -> plt.Figure:
    """The audit (``python -m ablation.audit``), one column per model: above, μ̂ ÷ the claimed
    μ of each mechanism's one-step and noise-schedule tests, with ±3 SE (a correct engine sits
    at 1 or below, the controls far above, on a log axis); below, the lower bounds on ε (one
    step, Clopper–Pearson; whole run, one-run) ÷ the claim's ε (the accountant's for the
    whole run), where a bound above 1 refutes the claim."""
    if table.empty:
        raise MissingCells("no audit record")
    mus = table[table["test"].isin(["one step", "noise schedule"])].copy()
    mus["ratio"] = mus["mu"] / mus["claim_mu"]
    mus["error"] = 3 * mus["mu_se"] / mus["claim_mu"]
    epsilons = table[table["test"].isin(["one step", "whole run"])].copy()
    epsilons["ratio"] = epsilons["epsilon_lower"] / epsilons["claim_epsilon"]
    drawn = marks(table, ["model", "mechanism", "test"],
                  ["mu", "mu_se", "claim_mu", "epsilon_lower", "claim_epsilon", "passed"],
                  "audit")
    models = sorted(table["model"].unique())
    fig, axes = plt.subplots(len(models), 2, figsize=(13, 0.6 + 3.4 * len(models)),
                             squeeze=False)
    styles = {"one step": ("o", -0.15), "noise schedule": ("s", 0.15), "whole run": ("^", 0.15)}
    for row, model in enumerate(models):
        here = table[table["model"] == model]
        mechanisms = (sorted(here.loc[here["control"].isna(), "mechanism"].unique())
                      + sorted(here.loc[here["control"].notna(), "mechanism"].unique()))
        position = {m: i for i, m in enumerate(mechanisms)}
        for col, (part, label) in enumerate(((mus, "μ̂ ÷ claimed μ (±3 SE)"),
                                             (epsilons, "ε lower bound ÷ claimed ε"))):
            ax = axes[row][col]
            drawn_here = part[part["model"] == model]
            for test, group in drawn_here.groupby("test"):
                marker, shift = styles[test]
                x = [position[m] + shift for m in group["mechanism"]]
                colors = ["tab:red" if c is not None and c == c else "tab:blue"
                          for c in group["control"]]
                values = group["ratio"].clip(lower=1e-3).replace(float("inf"), 1e6)
                if col == 0:
                    ax.errorbar(x, values, yerr=group["error"].fillna(0), fmt="none",
                                ecolor="grey", lw=0.8)
                ax.scatter(x, values, c=colors, marker=marker, s=22, label=test, zorder=3)
            ax.axhline(1.0, color="black", lw=0.8, ls="--")
            ax.set_yscale("log" if col == 0 else "symlog",
                          **({} if col == 0 else {"linthresh": 1.0}))
            ax.set_xticks(range(len(mechanisms)))
            ax.set_xticklabels(mechanisms, rotation=35, ha="right", rotation_mode="anchor",
                               fontsize=7)
            ax.grid(axis="x", color="0.92", lw=0.6)
            ax.set_ylabel(label, fontsize=8)
            ax.set_title(model, fontsize=9)
            ax.legend(fontsize=6, loc="upper left")
    fig.suptitle("Privacy audit: the engines (blue) against their claim; the controls (red) "
                 "must land above the line", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    return _with_marks(fig, drawn)


def save(fig: plt.Figure, folder: str | Path, name: str) -> list[Path]:
    """Write ``name.png``, ``name.pdf`` and ``name.csv`` (the numbers drawn, one row per mark,
    with the record behind each) into ``folder``; closes the figure."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for suffix in ("png", "pdf"):
        path = folder / f"{name}.{suffix}"
        fig.savefig(path, dpi=150, bbox_inches="tight")
        paths.append(path)
    table = getattr(fig, "ablation_marks", None)
    if table is not None:
        from ablation.report.records import write_text
        paths.append(write_text(folder / f"{name}.csv", table.to_csv(index=False)))
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


def draw_all(roots: Sequence[str | Path], out: str | Path,
             skipped: list[str] | None = None) -> list[Path]:
    """Every figure the results under ``roots`` support, one folder per device and family
    (``<out>/<device>/<experiment>-<family hash>/``), each with the CSV of its marks, and
    ``<out>/index.md`` saying which runs and settings each folder holds. A figure that cannot
    be drawn (cells missing, records that would share a mark) is named in ``skipped``; the
    others are still drawn."""
    frame = records.load(list(roots))
    if frame.empty:
        raise analysis.NoRecords(f"no result records (result.json) under "
                                 f"{', '.join(map(str, roots))}")
    timing, memory = analysis.timing_frame(frame), analysis.memory_frame(frame)
    unmeasured = analysis.unmeasured_cells(frame)
    skipped = [] if skipped is None else skipped
    written: list[Path] = []
    folders: list[tuple[str, str, Path, pd.DataFrame]] = []
    for device, family, t in analysis.groups(timing):
        folder = Path(out) / slug(device) / family
        jobs = [(f"runtimes_{model}",
                 lambda model=model: runtimes(t, model, unmeasured=unmeasured))
                for model in analysis.models_in(t)]
        choice = best_ablation_batch(t)
        if choice:
            jobs.append(("ablation", lambda: ablation(t, batch_size=choice[0], models=choice[1])))
            jobs.append(("decomposition",
                         lambda: decomposition(t, batch_size=choice[0], models=choice[1])))
        if t["compile_s"].notna().any():
            jobs.append(("compile_times", lambda: compile_times(t)))
        pairs = analysis.privacy_overhead(t)
        if not pairs.query("engine_label == 'both'").empty:
            jobs.append(("privacy_overhead", lambda: overhead(t)))
        if not pairs.query("engine_label == 'ghost'").empty:  # the engine built to cut it
            jobs.append(("privacy_overhead_ghost", lambda: overhead(t, engine="ghost")))
        if (t["processes"].fillna(1) > 1).any():
            jobs.append(("scaling", lambda: scaling(t)))
        written += _save_all(jobs, folder, device, family, skipped)
        folders.append((device, family, folder, t))
    for device, family, m in analysis.groups(memory):
        folder = Path(out) / slug(device) / family
        written += _save_all([("max_batch", lambda: max_batch(m))], folder, device, family,
                             skipped)
        folders.append((device, family, folder, m))
    audits = analysis.audit_frame(frame)
    for device, part in audits.groupby("device", sort=True):
        folder = Path(out) / slug(device) / "audit"
        written += _save_all([("audit", lambda part=part: audit(part))], folder, device,
                             "audit", skipped)
    if folders:
        written.append(_write_index(Path(out), folders, frame))
    return written


def _save_all(jobs, folder: Path, device: str, family: str, skipped: list[str]) -> list[Path]:
    written, drawn = [], 0
    for name, draw in jobs:
        try:
            written += save(draw(), folder, name)
            drawn += 1
        except (MissingCells, ValueError) as error:
            plt.close("all")
            skipped.append(f"{device} / {family} / {name}: {error}")
            print(f"[figures] not drawn: {device} / {family} / {name}: {error}", flush=True)
    print(f"{device} / {family}: {drawn} figures in {folder}")
    return written


def _flat(config: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(config, dict):
        return {prefix: config}
    out: dict[str, Any] = {}
    for key, value in config.items():
        if key not in ("hydra", "paths"):
            out.update(_flat(value, f"{prefix}{key}." if isinstance(value, dict) else
                             f"{prefix}{key}"))
    return out


def _write_index(out: Path, folders, records_frame: pd.DataFrame) -> Path:
    """``index.md``: for each figure folder, its device, the runs (sweep folders) its records
    come from, and the settings in which its family differs from the others drawn."""
    by_family = {f: _flat(c) for f, c in zip(records_frame["family"], records_frame["config"])
                 if isinstance(c, dict)}
    families = {family for _, _, _, part in folders for family in part["family"].unique()}
    keys = sorted({k for f in families for k in by_family.get(f, {})})
    varying = [k for k in keys if len({str(by_family.get(f, {}).get(k)) for f in families}) > 1
               and not k.startswith(("engine", "model.name", "batch_size", "private"))]
    lines = ["# Figures", "", "Each folder holds one family of records: the same machine, code "
             "and settings (the grid's engine, model, batch size and privacy aside). Each figure "
             "has a CSV beside it with the numbers it draws and the record behind each.", ""]
    for device, label, folder, part in folders:
        sweeps = sorted({str(Path(p).parent.parent) for p in part.get("path", [])})
        family = part["family"].iloc[0]
        settings = by_family.get(family, {})
        shown = ", ".join(f"{k}={settings.get(k)}" for k in varying) or "as the others"
        lines += [f"## {folder.relative_to(out)}", "", f"- device: {device}",
                  f"- records: {len(part)}, from: {', '.join(sweeps[:4])}"
                  + (f" and {len(sweeps) - 4} more" if len(sweeps) > 4 else ""),
                  f"- settings: {shown}", ""]
    from ablation.report.records import write_text
    return write_text(out / "index.md", "\n".join(lines))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ablation.figures",
                                     description="Draw every figure from result records.")
    parser.add_argument("roots", nargs="*", default=["outputs"],
                        help="folders searched for result.json (default: outputs)")
    parser.add_argument("--out", default="outputs/figures", help="where figures go")
    args = parser.parse_args(argv)
    skipped: list[str] = []
    try:
        written = draw_all(args.roots, args.out, skipped)
    except analysis.NoRecords as error:
        print(f"error: {error}: run `python -m ablation.run` first", file=sys.stderr)
        return 1
    if not written:
        print("no figure to draw: the records hold no ok cell", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
