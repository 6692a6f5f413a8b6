"""Figures of val loss curves: plot_records() (the `plot` command and `compare --png`: the whole run
and a panel zoomed near the target, side by side) and plot_submission() (the same two panels as the
two figures of a result folder). curves() computes, per record, the mean and band (min-max or
± std) of its counted trials at the steps they share; draw_full() and draw_zoom() draw a panel.
matplotlib is imported only when a figure is drawn (pyplot()), with a file-only backend.
"""

if __name__ == "__main__":  # a module of the toolkit, not a command
    raise SystemExit("tools/plots.py is a module of the records toolkit, not a command: "
                     "python tools/records.py --help lists the commands")

import os

import numpy as np

from tools.logs import RecordsError
from tools.stats import DEFAULT_TARGET, claimed, summarize
from tools.trials import loss_at, screen


def checked_png(path, flag="--png"):
    """`path` when it names a PNG file to write: it ends in .png (matplotlib picks the format from
    the name, and adds .png to a name without one: the file written would not be the one named)
    and is not a directory; RecordsError otherwise."""
    if os.path.splitext(os.path.basename(path or ""))[1].lower() != ".png":
        raise RecordsError(f"{flag} {path!r}: the figure is a PNG file: give a file name ending in "
                           ".png (e.g. curves.png)")
    if os.path.isdir(path):
        raise RecordsError(f"{flag} {path!r} is a directory: give a file name ending in .png")
    return path


def curves(records, target, band):
    """Per record: (label, summary, steps, mean, lo, hi) of its counted runs."""
    if band not in ("minmax", "std"):
        raise RecordsError(f"band must be 'minmax' or 'std', not {band!r}")
    if not records:
        raise RecordsError("nothing to plot")
    out = []
    for label, runs in records.items():
        s = summarize(runs, target)
        counted = screen(claimed(runs, target))["counted"]
        steps = np.array(s["steps"])
        values = np.array([[loss_at(r, st) for st in steps] for r in counted])
        mean = values.mean(0)
        if band == "minmax":
            lo, hi = values.min(0), values.max(0)
        else:
            std = values.std(0, ddof=1) if len(counted) > 1 else np.zeros_like(mean)
            lo, hi = mean - std, mean + std
        out.append((label, s, steps, mean, lo, hi))
    return out


def draw_full(ax, data, target, band, metric):
    bottom, top = target - 0.05, target + 0.5
    for label, s, steps, mean, lo, hi in data:
        record = f"step {s['step']}" if s["step"] is not None else "no record"
        line, = ax.plot(steps, mean, label=f"{label} (n={s['n']}, {record})")
        ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.2)
        top = max(top, min(4.5, float(np.nanmax(mean))))
        bottom = min(bottom, float(np.nanmin(mean)) - 0.01)
    ax.axhline(target, color="gray", linestyle="--", linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.set_title(f"mean {metric} ({'min-max' if band == 'minmax' else '± std'} band)")
    ax.set_ylim(bottom, top)  # the first steps (loss ~11) would flatten everything else
    ax.legend(fontsize=8)


def draw_zoom(ax, data, target, metric, legend=False):
    last, near = 0, []
    for label, s, steps, mean, lo, hi in data:
        record = f"step {s['step']}" if s["step"] is not None else "no record"
        line, = ax.plot(steps, mean, label=f"{label} (n={s['n']}, {record})")
        ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.2)
        if s["step"] is not None:
            ax.axvline(s["step"], color=line.get_color(), linestyle=":", linewidth=1)
        last = max(last, int(steps[-1]))
        # the zoom starts where the first record comes within the panel's y range of the target
        near += [int(st) for st, m in zip(steps, mean) if m <= target + 0.06][:1]
    ax.axhline(target, color="gray", linestyle="--", linewidth=1)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    start = min(near) if near else 0.7 * last
    ax.set_xlim(start - 0.02 * (last - start), last + 0.02 * (last - start) + 1)
    ax.set_ylim(target - 0.02, target + 0.06)
    ax.set_title(f"near the target {target} (dotted: record step)")
    if legend:
        ax.set_ylabel(metric)
        ax.legend(fontsize=8)


def save(fig, png_path, plt):
    fig.tight_layout()
    try:
        fig.savefig(png_path, dpi=120)
    except OSError as e:
        raise RecordsError(f"cannot write {png_path}: {e.strerror or e}") from None
    finally:
        plt.close(fig)


def pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only: works without a display
    import matplotlib.pyplot as plt
    return plt


def plot_records(records, png_path, target=DEFAULT_TARGET, band="minmax", metric="val_loss"):
    """Mean val-loss curve of each record with a min-max or mean ± std band: the whole run (y axis
    cut at 4.5), and a panel zoomed near the target (target - 0.02 .. target + 0.06, from the first
    step where a mean curve enters that range). `records` maps a label to its runs (counted runs
    only are drawn: see screen()); `metric` (the field drawn) labels the y axis."""
    checked_png(png_path)
    data = curves(records, target, band)
    plt = pyplot()
    fig, (full, zoom) = plt.subplots(1, 2, figsize=(12, 4.5))
    draw_full(full, data, target, band, metric)
    draw_zoom(zoom, data, target, metric)
    save(fig, png_path, plt)


def plot_submission(records, full_png, zoom_png, target=DEFAULT_TARGET, band="minmax",
                    metric="val_loss"):
    """The two figures of an upstream result folder: whole curves, and zoomed near the target."""
    data = curves(records, target, band)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    draw_full(ax, data, target, band, metric)
    save(fig, full_png, plt)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    draw_zoom(ax, data, target, metric, legend=True)
    save(fig, zoom_png, plt)
