"""Every figure mmkd writes: accuracy bars and loss curves of the main job, the sweep heatmap, the bias and
compression-report plots. Each function draws into a PNG with matplotlib's Agg backend and returns the path."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mmkd.reporting.tables import fmt


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def sweep_heatmap(grid, alphas: list[float], temperatures: list[float], metric: str, path: str | Path,
                  row_label: str = "α", col_label: str = "temperature T", metric_label: str | None = None) -> Path:
    """A grid of a validation metric (fractions), rows ``alphas`` × columns ``temperatures`` (or any two
    parameters, named by ``row_label`` / ``col_label``), each cell labelled in %; empty cells (``nan``) blank."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.2 * len(temperatures) + 2, 0.9 * len(alphas) + 1.5))
    im = ax.imshow(100 * grid, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(temperatures)), [f"{t:g}" for t in temperatures])
    ax.set_yticks(range(len(alphas)), [f"{a:g}" for a in alphas])
    ax.set_xlabel(col_label)
    ax.set_ylabel(row_label)
    for i in range(len(alphas)):
        for j in range(len(temperatures)):
            if np.isnan(grid[i, j]):
                continue
            bright = im.norm(100 * grid[i, j]) > 0.6  # viridis turns yellow: dark text there
            ax.text(j, i, f"{100 * grid[i, j]:.1f}", ha="center", va="center", color="k" if bright else "w",
                    fontsize=8)
    fig.colorbar(im, label=metric_label or f"validation {metric} (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def accuracy_bars(rows: list[dict[str, Any]], path: Path) -> Path:
    """Zero-shot acc@1 and acc@5 bars per model (rows with ``model``, ``layers``, ``parameters``, ``acc1``, ``acc5``)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    x = np.arange(len(rows))
    for i, (key, label) in enumerate((("acc1", "acc@1"), ("acc5", "acc@5"))):
        values = [100 * r[key] for r in rows]
        bars = ax.bar(x + (i - 0.5) * 0.38, values, 0.38, label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks(x, [f"{r['model']}\n{r['layers']} layers, {r['parameters'] / 1e6:.1f} M" for r in rows])
    ax.set_ylabel("zero-shot accuracy on the test split (%)")
    ax.set_ylim(0, 105)
    ax.legend(loc="lower right")
    ax.set_title("Fashion-MNIST zero-shot accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def loss_curves(folders: dict[str, Path], path: Path) -> Path:
    """Each run's logged loss and loss terms (``trainer_state.json``) against the step, one panel per run."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(folders), figsize=(4.2 * len(folders), 3.4), squeeze=False)
    for ax, (name, folder) in zip(axes[0], folders.items(), strict=True):
        history = json.loads((folder / "trainer_state.json").read_text())["log_history"]
        terms = sorted({k for h in history for k in h if k == "loss" or k.startswith("loss_")})
        for term in terms:
            points = [(h["step"], h[term]) for h in history if term in h]
            ax.plot(*zip(*points, strict=True), label=term, lw=2 if term == "loss" else 1)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("training loss (weighted terms)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- the compression report -----------------------------------------------------------------------------
# technique -> (marker, colour): the legend reads one entry per technique; the labels name each model
_MARKERS = {"teacher": ("*", "C0"), "student": ("o", "C2"), "int8": ("s", "C1"), "magnitude pruning": ("v", "C4"),
            "structured pruning": ("D", "C3"), "onnx": ("P", "C5"), "onnx int8": ("X", "C6")}


def plotted_size(row: dict[str, Any]) -> float:
    """The x of a row: its size on disk in MB, or for a magnitude-pruned model the size of its sparse (CSR) copy --
    its dense file is the teacher's size, and the point of pruning is the smaller sparse one."""
    if row.get("technique") == "magnitude pruning" and row.get("sparse_size_mb"):
        return row["sparse_size_mb"]
    return row["size_mb"]


def compression_plot(report: dict[str, Any], path: str | Path) -> dict[str, list[tuple[str, float, float]]]:
    """Save the accuracy-vs-size plot (and image-throughput-vs-size beside it) as an image: size on a log axis, one
    marker shape per technique (teacher, student, int8, magnitude / structured pruning), an arrow from each model
    to what was made of it (teacher -> student, model -> its int8 or pruned copy), points labelled.

    Without accuracies only the throughput panel is drawn. Returns the plotted points per panel,
    ``{"acc1": [(label, size_mb, acc@1 %)], "image_per_s": [(label, size_mb, images/s)]}`` (size as
    :func:`plotted_size`).
    """
    plt = _pyplot()
    rows = report["rows"]
    panels: dict[str, list[tuple[str, float, float]]] = {}
    if all(r["acc1"] is not None for r in rows):
        panels["acc1"] = [(r["model"], plotted_size(r), 100 * r["acc1"]) for r in rows]
    panels["image_per_s"] = [(r["model"], plotted_size(r), r["image_per_s"]) for r in rows]
    titles = {"acc1": "zero-shot acc@1 (%)", "image_per_s": "image encodings / s"}
    fig, axes = plt.subplots(1, len(panels), figsize=(7.5 * len(panels), 5.5), squeeze=False)
    for ax, (key, points) in zip(axes[0], panels.items(), strict=True):
        where = {label: (x, y) for label, x, y in points}
        for row in rows:  # arrows first, under the markers
            if row.get("source") in where:
                ax.annotate("", xy=where[row["model"]], xytext=where[row["source"]],
                            arrowprops={"arrowstyle": "->", "color": "0.55", "lw": 1.0, "shrinkA": 6, "shrinkB": 6})
        for i, (row, (label, x, y)) in enumerate(zip(rows, points, strict=True)):
            marker, colour = _MARKERS.get(row.get("technique", "student"), ("o", "C7"))
            ax.scatter([x], [y], s=130 if marker == "*" else 60, marker=marker, color=colour, zorder=3,
                       label=row.get("technique"))
            # alternate above / below the point: neighbours of similar size and value do not overwrite each other
            ax.annotate(f"{label}\n{y:.1f}", (x, y), textcoords="offset points", xytext=(6, 8 if i % 2 == 0 else -24),
                        fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel("size on disk (MB, log; magnitude-pruned: its sparse CSR copy)")
        ax.set_ylabel(titles[key])
        ax.set_title(f"{titles[key]} vs size")
        ax.grid(alpha=0.3, which="both")
        xs, ys = [p[1] for p in points], [p[2] for p in points]
        ax.set_xlim(min(xs) / 1.6, max(xs) * 1.6)
        ax.set_ylim(min(0.0, min(ys)), max(ys) * 1.2 if max(ys) > 0 else 1.0)
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles, strict=True))  # one legend entry per technique
        ax.legend(unique.values(), unique.keys(), fontsize=8, loc="best")
    dataset = report["dataset"]["name"] if report.get("dataset") else "no dataset"
    fig.suptitle(f"distillation vs int8 vs pruning -- {dataset}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return panels


# -- gender-profession bias ------------------------------------------------------------------------------
_COLOURS = {"male": "#2b6cb0", "female": "#dd6b20", None: "#8a8f98"}


_FLIP = "#c53030"


def _weat_text(r) -> str:
    return f"WEAT d = {fmt(r.effect_size)}, p = {fmt(r.p_value, '.3g')}"


def _direction_labels(ax) -> None:
    ax.axvline(0.0, color="black", linewidth=1.0, zorder=3)
    kw = dict(transform=ax.transAxes, fontsize=9, color="#444444", va="bottom")
    ax.text(0.99, 1.005, "male-associated →", ha="right", **kw)
    ax.text(0.01, 1.005, "← female-associated", ha="left", **kw)


def _bar_axes(ax, n: int, values: np.ndarray, xlabel: str) -> None:
    """Shared look of the bar panels: symmetric x range around the zero line, direction labels, grid."""
    m = float(np.abs(values).max()) * 1.12 or 1.0
    ax.set_xlim(-m, m)
    ax.set_ylim(-0.7, n - 0.3)
    ax.set_xlabel(xlabel)
    ax.grid(axis="x", color="#e2e8f0", zorder=0)
    _direction_labels(ax)


def _comparison_text(cmp: Mapping[str, Any], labels: tuple[str, str]) -> str:
    k = cmp["top_k"]
    lines = [
        f"effect size change ({labels[1]} − {labels[0]}): {fmt(cmp['effect_size_change'], '+.3f')}",
        f"mean |association change|: {cmp['mean_abs_change']:.4f}",
    ]
    for side in ("male", "female"):
        o = cmp[f"most_{side}_overlap"]
        lines.append(f"top-{k} most {side}: {len(o['common'])}/{k} shared")
        lines.append(f"  {labels[0][:14]:<14} {', '.join(o['teacher'])}")
        lines.append(f"  {labels[1][:14]:<14} {', '.join(o['student'])}")
    flipped = [f["profession"] for f in cmp["flipped"]]
    lines.append(
        f"flipped ({len(flipped)}): {', '.join(flipped[:8]) or 'none'}{' …' if len(flipped) > 8 else ''}"
    )
    return "\n".join(lines)


def bias_plot(
    report,
    compare_to=None,
    path: str | Path = "bias.png",
    labels: tuple[str, str] = ("teacher", "student"),
) -> Path:
    """Draw the per-profession associations to a PNG and return its path.

    One report: horizontal bars sorted by association (male-associated to the right of the zero line,
    female-associated to the left), coloured by the profession's stereotype, WEAT d and p in the title. With
    ``compare_to`` (``report`` is ``labels[0]``, usually the teacher; ``compare_to`` is ``labels[1]``): paired bars
    sorted by the first model's score, next to a scatter of the first model's score against the second's with
    the diagonal, flipped professions in red, and Spearman rho and both effect sizes in the title.
    """
    from matplotlib.patches import Patch

    from mmkd.eval.bias import as_report, compare_bias

    plt = _pyplot()
    first = as_report(report)
    second = None if compare_to is None else as_report(compare_to)
    if len(labels) != 2:
        raise ValueError(f"labels must be two names, got {labels!r}")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    xlabel = "association = mean cos(male terms) − mean cos(female terms)"
    legend = [
        Patch(color=_COLOURS["male"], label="stereotyped male (WinoBias/BLS)"),
        Patch(color=_COLOURS["female"], label="stereotyped female"),
    ]
    if any(s is None for s in first.stereotypes.values()):
        legend.append(Patch(color=_COLOURS[None], label="no stereotype"))

    if second is None:
        names = sorted(first.association, key=first.association.get)
        values = np.array([first.association[p] for p in names])
        height = max(4.0, 0.24 * len(names) + 2.2)
        fig, ax = plt.subplots(figsize=(8, height))
        ax.barh(
            range(len(names)), values, color=[_COLOURS[first.stereotypes.get(p)] for p in names], zorder=2
        )
        ax.set_yticks(range(len(names)), names, fontsize=9)
        _bar_axes(ax, len(names), values, xlabel)
        ax.set_title(
            f"Gender–profession association: {first.model}\n{_weat_text(first)}", fontsize=11, pad=18
        )
        fig.legend(handles=legend, loc="lower center", ncol=len(legend), fontsize=8, frameon=False)
        fig.tight_layout(rect=(0, 0.35 / height, 1, 1))
    else:
        cmp = compare_bias(first, second)
        common = [p for p in first.association if p in second.association]
        names = sorted(common, key=first.association.get)
        flipped = {f["profession"] for f in cmp["flipped"]}
        a = np.array([first.association[p] for p in names])
        b = np.array([second.association[p] for p in names])
        height = max(7.0, 0.3 * len(names) + 2.2)
        fig = plt.figure(figsize=(14, height))
        grid = fig.add_gridspec(2, 2, width_ratios=[3, 2], height_ratios=[3, 2])
        ax, sc, info = fig.add_subplot(grid[:, 0]), fig.add_subplot(grid[0, 1]), fig.add_subplot(grid[1, 1])
        y = np.arange(len(names))
        ax.barh(y + 0.2, a, height=0.4, color="#4a5568", label=labels[0], zorder=2)
        ax.barh(y - 0.2, b, height=0.4, color="#63b3ed", label=labels[1], zorder=2)
        ax.set_yticks(y, [f"{p} *" if p in flipped else p for p in names], fontsize=9)
        for tick, p in zip(ax.get_yticklabels(), names, strict=True):
            tick.set_color(_FLIP if p in flipped else _COLOURS[first.stereotypes.get(p)])
            tick.set_fontweight("bold" if p in flipped else "normal")
        _bar_axes(ax, len(names), np.concatenate([a, b]), xlabel)
        ax.set_title(f"sorted by {labels[0]} association", fontsize=10, pad=18)
        handles, _ = ax.get_legend_handles_labels()
        label_key = [
            Patch(color=_COLOURS["male"], label="stereotyped male (WinoBias/BLS)"),
            Patch(color=_COLOURS["female"], label="stereotyped female"),
            Patch(color=_FLIP, label="direction flipped (*)"),
        ]
        fig.legend(handles=handles + label_key, loc="lower center", ncol=5, fontsize=8, frameon=False)

        colours = [_FLIP if p in flipped else _COLOURS[first.stereotypes.get(p)] for p in names]
        sc.scatter(a, b, c=colours, s=30, zorder=3, edgecolors="white", linewidths=0.5)
        lo, hi = float(min(a.min(), b.min(), 0.0)), float(max(a.max(), b.max(), 0.0))
        pad = 0.08 * (hi - lo or 1.0)
        lo, hi = lo - pad, hi + pad
        sc.plot([lo, hi], [lo, hi], "--", color="#718096", linewidth=1, zorder=1)
        sc.axhline(0, color="black", linewidth=0.8, zorder=2)
        sc.axvline(0, color="black", linewidth=0.8, zorder=2)
        sc.set_xlim(lo, hi)
        sc.set_ylim(lo, hi)
        sc.set_aspect("equal", adjustable="box")
        for p, xa, yb in zip(names, a, b, strict=True):
            if p in flipped:
                sc.annotate(p, (xa, yb), xytext=(4, 3), textcoords="offset points", fontsize=8, color=_FLIP)
        sc.set_xlabel(f"{labels[0]} association (→ male)")
        sc.set_ylabel(f"{labels[1]} association (→ male)")
        sc.grid(color="#e2e8f0", zorder=0)
        sc.set_title(
            f"Spearman ρ = {fmt(cmp['spearman_rho'], '.3f')}, {len(flipped)} flipped (dashed: equal scores)\n"
            f"WEAT d: {labels[0]} {fmt(first.effect_size)}, {labels[1]} {fmt(second.effect_size)}",
            fontsize=10,
        )
        info.axis("off")
        info.text(
            0,
            1,
            _comparison_text(cmp, labels),
            va="top",
            ha="left",
            fontsize=9,
            family="monospace",
            transform=info.transAxes,
            wrap=True,
        )
        fig.suptitle(
            f"Gender–profession association: {labels[0]} vs {labels[1]}\n({first.model} vs {second.model})",
            fontsize=11,
        )
        fig.tight_layout(rect=(0, 0.35 / height, 1, 1))
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def study_bars(rows: list[dict[str, Any]], path: str | Path, title: str) -> Path:
    """One bar per row (``label``, mean ``acc1``, ``acc1_sd`` as the error bar) of a study's table, in %."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.3 * len(rows) + 2, 4))
    ys = [100 * r["acc1"] for r in rows]
    bars = ax.bar(range(len(rows)), ys, 0.6, yerr=[100 * (r.get("acc1_sd") or 0) for r in rows], capsize=3)
    ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_xticks(range(len(rows)), [r["label"].replace(" (", "\n(") for r in rows], fontsize=7)
    ax.set_ylabel("zero-shot acc@1 (%)")
    ax.set_ylim(max(0, min(ys) - 5), min(100, max(ys) + 3))
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def fraction_curve(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Accuracy against the share of training images (log axis) for scratch and KD (rows with ``fraction``,
    ``scratch`` and ``kd`` rows of ``acc1`` / ``acc1_sd``), the margin on a second axis."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    xs = [100 * r["fraction"] for r in rows]
    for key, label in (("scratch", "from scratch (α = 0)"), ("kd", "KD")):
        ax.errorbar(xs, [100 * r[key]["acc1"] for r in rows], yerr=[100 * (r[key].get("acc1_sd") or 0) for r in rows],
                    marker="o", capsize=3, label=label)
    ax.set_xscale("log")
    ax.set_xticks(xs, [f"{x:g}" for x in xs])
    ax.set_xlabel("training images (% of 20,000), same steps")
    ax.set_ylabel("zero-shot acc@1 (%)")
    margin = ax.twinx()
    margin.bar(xs, [100 * r["margin"] for r in rows], width=[0.25 * x for x in xs], alpha=0.25, color="grey")
    margin.set_ylabel("KD − scratch (points, bars)")
    ax.legend(loc="lower right")
    ax.set_title("data fraction (Fashion-MNIST, 2+2 × 96 student)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
