"""PNG plots for the reports (matplotlib, Agg backend: no display needed).

Each function writes its figure next to report.md and returns (title, file name)
pairs for the markdown links.
"""

from pathlib import Path

MEASURE = "best_val_loss"  # the verdict measure, plotted against each swept value
SWEEP_PNG, SWEEP_TITLE = "sweep.png", "best val loss vs swept value"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, directory: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(directory / name, dpi=110)
    _pyplot().close(fig)
    return name


def _x_scale(x_column) -> float:
    """Tokens are plotted in millions, seconds as they are."""
    return 1e6 if x_column == "tokens" else 1.0


def _colours(plt, variants) -> dict:
    """One colour per step, the same in every plot."""
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {v: cycle[i % len(cycle)] for i, v in enumerate(variants)}


def _curves(plt, records, variants, x_column, x_label, matched, title):
    """Validation loss against x: one colour per step, one line per seed."""
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    colours = _colours(plt, variants)
    for variant in variants:
        first = True
        for r in records:
            if r.variant != variant or r.evals.empty:
                continue
            points = r.evals[[x_column, "val_loss"]].dropna()
            x = points[x_column] / _x_scale(x_column)
            ax.plot(x, points["val_loss"], color=colours[variant], alpha=0.85 if r.done else 0.35,
                    linestyle="-" if r.done else ":", marker="." if len(points) < 30 else None,
                    label=variant if first else None)
            first = False
    if matched is not None:
        ax.axvline(matched / _x_scale(x_column), color="grey", linestyle="--", linewidth=1,
                   label="matched point")
    ax.set_xlabel(x_label)
    ax.set_ylabel("validation loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return fig


def _gate_figure(plt, gates, colours=None):
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(9, 4), sharex=True)
    for (variant, rows) in gates.groupby("variant", sort=False):
        for ax, name in zip(axes, ("w_std", "w_rec")):
            ax.errorbar(rows["layer"], rows[f"{name}_mean"], yerr=rows[f"{name}_std"], marker="o", capsize=3,
                        label=variant, color=(colours or {}).get(variant))
    for ax, name in zip(axes, ("w_std", "w_rec")):
        ax.set_title(f"{name} per layer (mean ± std over heads)")
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return fig


def matrix_plots(matrix_dir, records, steps, gates, variants, matched_time, matched_tokens, sweep=None,
                 sweep_axes=()) -> list:
    """The matrix report's PNGs; sweep (lib.report.sweep.sweep_table) and its axes [(symbol, values)] add
    sweep.png."""
    plt = _pyplot()
    matrix_dir = Path(matrix_dir)
    ids = [v.id for v in variants]
    plots = [
        ("validation loss vs training time",
         _save(_curves(plt, records, ids, "train_time_s", "training time (s)", matched_time,
                       "Validation loss vs training time"), matrix_dir, "val_loss_vs_time.png")),
        ("validation loss vs tokens",
         _save(_curves(plt, records, ids, "tokens", "tokens seen (millions)", matched_tokens,
                       "Validation loss vs tokens"), matrix_dir, "val_loss_vs_tokens.png")),
    ]
    fig, ax = plt.subplots(figsize=(max(4.5, 0.9 * len(ids) + 2), 4))
    colours = _colours(plt, ids)
    ax.bar(steps["variant"], steps["tokens_per_s"].fillna(0), yerr=steps["tokens_per_s_std"].fillna(0).to_numpy(),
           capsize=4, color=[colours[v] for v in steps["variant"]], alpha=0.85)
    ax.set_ylabel("tokens/s (mean over seeds)")
    ax.set_title("Throughput per step")
    ax.grid(alpha=0.3, axis="y")
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    plots.append(("throughput per step", _save(fig, matrix_dir, "throughput.png")))
    if not gates.empty:
        plots.append(("gate values per layer", _save(_gate_figure(plt, gates, colours), matrix_dir, "gates.png")))
    if sweep is not None and not sweep.empty:
        plots.append((SWEEP_TITLE, _save(sweep_figure(sweep, sweep_axes), matrix_dir, SWEEP_PNG)))
    return plots


def _value_positions(values) -> tuple:
    """(x position of each swept value, log scale?): numbers where every value is one, else 0, 1, 2, ...;
    log scale when the positive values span a factor of 10 or more (learning rates)."""
    try:
        numbers = [float(v) for v in values]
    except ValueError:
        return {v: i for i, v in enumerate(values)}, False
    log = min(numbers) > 0 and max(numbers) >= 10 * min(numbers)
    return dict(zip(values, numbers)), log


def sweep_figure(sweep, axes):
    """Best val loss (mean ± 95% CI over seeds) against each swept value: one panel per axis, one line per step
    and value of the other axes; a step the axis does not apply to is a dashed line at its one value."""
    plt = _pyplot()
    fig, panels = plt.subplots(1, len(axes), figsize=(6 * len(axes), 4.2), squeeze=False)
    colours = _colours(plt, list(dict.fromkeys(sweep["step"])))
    for panel, (axis, values) in zip(panels[0], axes):
        x_of, log = _value_positions(values)
        others = [a for a, _ in axes if a != axis]
        for (step, *rest), rows in sweep.groupby(["step", *others], sort=False):
            label = " ".join([step, *(f"{a}={v}" for a, v in zip(others, rest) if v)])
            rows = rows[rows[MEASURE].notna()]
            swept = rows[rows[axis] != ""]
            if len(swept):
                panel.errorbar([x_of[v] for v in swept[axis]], swept[MEASURE], yerr=swept[MEASURE + "_ci95"].fillna(0),
                               marker="o", capsize=3, label=label, color=colours[step])
            for mean in rows[rows[axis] == ""][MEASURE]:
                panel.axhline(mean, linestyle="--", linewidth=1, color=colours[step], label=f"{label} (not swept)")
        if log:
            panel.set_xscale("log")
        panel.set_xticks([x_of[v] for v in values], list(values))
        panel.set_xlabel(axis)
        panel.set_ylabel("best val loss (mean ± 95% CI)")
        panel.grid(alpha=0.3)
        if panel.get_legend_handles_labels()[0]:
            panel.legend(fontsize=8)
    return fig


def run_plots(run_dir, record, gates) -> list:
    """Loss curves against time and tokens; gates (lib.report.data.gate_table of the run) per layer."""
    plt = _pyplot()
    run_dir = Path(run_dir)
    if record.evals.empty:
        return []
    plots = []
    for x_column, x_label, name in (("train_time_s", "training time (s)", "val_loss_vs_time.png"),
                                    ("tokens", "tokens seen (millions)", "val_loss_vs_tokens.png")):
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for column, style in (("train_loss", "--"), ("val_loss", "-")):
            points = record.evals[[x_column, column]].dropna()
            if not points.empty:
                ax.plot(points[x_column] / _x_scale(x_column), points[column], style, marker="." if len(points) < 30 else None,
                        label=column.replace("_", " "))
        ax.set_xlabel(x_label)
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend()
        ax.set_title(f"{run_dir.name}: loss vs {x_label.split(' (')[0]}")
        plots.append((f"loss vs {x_label.split(' (')[0]}", _save(fig, run_dir, name)))
    if not gates.empty:
        plots.append(("gate values per layer", _save(_gate_figure(plt, gates), run_dir, "gates.png")))
    return plots
