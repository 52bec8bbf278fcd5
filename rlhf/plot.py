"""``python -m rlhf.plot RUN_DIR``: a run's dashboard panels as PNG, from its CSV log.

The panels are the W&B reward/KL view of ``docs/tracking.md``: for PPO reward vs step, KL
vs step, reward vs KL, policy entropy, clip fraction and value explained variance; loss,
accuracy and margin for a reward model; loss and perplexity for SFT. ``RUN_DIR`` is a
``metrics.csv``, a CSV logger's version directory, or any directory above one (the newest
``metrics.csv`` below it is used, e.g. ``runs/quickstart/ppo``). Each panel is written as
``OUT/<panel>.png`` and all of them together as ``OUT/dashboard.png``
(``OUT`` defaults to ``RUN_DIR/plots``).

    python -m rlhf.plot runs/quickstart/ppo --out docs/figures/ppo
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure

STEP = "step"


@dataclass(frozen=True)
class Panel:
    """One plot: ``ys`` against ``x`` (a line per column, or a scatter coloured by step)."""

    name: str
    title: str
    ys: tuple[str, ...]
    x: str = STEP
    kind: str = "line"  # "line" or "scatter"


PANELS: dict[str, tuple[Panel, ...]] = {
    "ppo": (
        Panel("reward", "RM score vs step", ("reward/mean", "val/reward/mean")),
        Panel("kl", "KL to the reference vs step (nats / response)", ("kl/mean", "val/kl/mean")),
        Panel("reward_vs_kl", "RM score vs KL", ("reward/mean", "val/reward/mean"), x="kl/mean", kind="scatter"),
        Panel("entropy", "Policy entropy (nats / token)", ("policy/entropy",)),
        Panel("clipfrac", "Clip fraction", ("policy/clipfrac", "value/clipfrac")),
        Panel("explained_var", "Value explained variance", ("value/explained_var",)),
    ),
    "rm": (
        Panel("loss", "Bradley-Terry loss", ("train/loss", "val/loss")),
        Panel("accuracy", "Pairwise accuracy", ("train/accuracy", "val/accuracy")),
        Panel("margin", "Score margin (chosen - rejected)", ("train/margin", "val/margin")),
    ),
    "sft": (
        Panel("loss", "Response-token loss", ("train/loss", "val/loss")),
        Panel("perplexity", "Validation perplexity", ("val/perplexity",)),
    ),
}


def find_metrics_csv(run_dir: str | Path) -> Path:
    """``run_dir`` if it is a CSV file, else ``run_dir/metrics.csv``, else the newest
    ``metrics.csv`` anywhere below ``run_dir``."""
    path = Path(run_dir)
    if path.is_file():
        return path
    if (path / "metrics.csv").is_file():
        return path / "metrics.csv"
    found = sorted(path.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no metrics.csv under {path} (is it a run with a CSVLogger?)")
    return found[-1]


def read_metrics(path: str | Path) -> dict[str, list[float]]:
    """Columns of a Lightning ``metrics.csv`` as float lists (``nan`` where a row has no
    value: train and validation metrics are logged on different rows)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    columns: dict[str, list[float]] = {}
    for name in rows[0].keys() if rows else []:
        values = []
        for row in rows:
            try:
                values.append(float(row[name]) if row[name] not in ("", None) else math.nan)
            except ValueError:
                values.append(math.nan)
        columns[name] = values
    return columns


def detect_stage(columns: dict[str, list[float]]) -> str:
    """``ppo``, ``rm`` or ``sft`` from the logged metric names."""
    if "reward/mean" in columns or "val/reward/mean" in columns:
        return "ppo"
    if "train/accuracy" in columns or "val/accuracy" in columns:
        return "rm"
    return "sft"


def series(columns: dict[str, list[float]], x: str, y: str) -> tuple[list[float], list[float]]:
    """The rows where both ``x`` and ``y`` have values."""
    if x not in columns or y not in columns:
        return [], []
    pairs = [(a, b) for a, b in zip(columns[x], columns[y]) if not (math.isnan(a) or math.isnan(b))]
    return [a for a, _ in pairs], [b for _, b in pairs]


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over up to ``window`` values (the first points average fewer)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def x_column(panel: Panel, y: str) -> str:
    """The x column of series ``y``: a scatter pairs ``val/`` series with ``val/<x>``."""
    if panel.kind == "scatter" and y.startswith("val/"):
        return "val/" + panel.x
    return panel.x


def has_data(columns: dict[str, list[float]], panel: Panel) -> bool:
    """Whether any of the panel's series has a point."""
    return any(series(columns, x_column(panel, y), y)[0] for y in panel.ys)


def draw_panel(ax: Axes, columns: dict[str, list[float]], panel: Panel, smooth: int = 5) -> None:
    """Draw ``panel`` on ``ax``. Training series get a ``smooth``-step moving average on top
    of the raw (faint) line; validation series are drawn as points joined by a line."""
    if panel.kind == "scatter":
        for y in panel.ys:
            x_name = x_column(panel, y)
            xs, ys = series(columns, x_name, y)
            if not xs:
                continue
            if y.startswith("val/"):
                ax.plot(xs, ys, "s--", color="black", label=f"{y} vs {x_name}", zorder=3)
            else:
                steps = [s for s, a, b in zip(columns.get(STEP, []), columns[x_name], columns[y])
                         if not (math.isnan(a) or math.isnan(b))]
                points = ax.scatter(xs, ys, c=steps or None, cmap="viridis", s=18, label=y)
                if steps:
                    ax.figure.colorbar(points, ax=ax, label="step")
        ax.set_xlabel("KL (nats / response)")
        ax.set_ylabel("RM score")
    else:
        for y in panel.ys:
            xs, ys = series(columns, panel.x, y)
            if not xs:
                continue
            if y.startswith("val/"):
                ax.plot(xs, ys, "o-", label=y, zorder=3)
            elif smooth > 1 and len(ys) > smooth:
                line = ax.plot(xs, ys, alpha=0.3, linewidth=1)[0]
                ax.plot(xs, moving_average(ys, smooth), color=line.get_color(), label=f"{y} ({smooth}-step mean)")
            else:
                ax.plot(xs, ys, label=y)
        ax.set_xlabel(panel.x)
    ax.set_title(panel.title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def render(
    run_dir: str | Path,
    out_dir: str | Path | None = None,
    stage: str | None = None,
    smooth: int = 5,
    dpi: int = 110,
) -> list[Path]:
    """Write each panel with data as ``out_dir/<panel>.png`` and all of them as
    ``out_dir/dashboard.png``; returns the written paths (the dashboard last)."""
    csv_path = find_metrics_csv(run_dir)
    columns = read_metrics(csv_path)
    stage = stage or detect_stage(columns)
    if stage not in PANELS:
        raise ValueError(f"stage must be one of {sorted(PANELS)}, got {stage!r}")
    panels = [p for p in PANELS[stage] if has_data(columns, p)]
    if not panels:
        raise ValueError(f"{csv_path} has none of the {stage} panels' metrics")
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for panel in panels:
        fig = Figure(figsize=(5.5, 3.6), layout="constrained")
        draw_panel(fig.add_subplot(), columns, panel, smooth)
        path = out / f"{panel.name}.png"
        fig.savefig(path, dpi=dpi)
        written.append(path)
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(5.2 * ncols, 3.6 * nrows), layout="constrained")
    for i, panel in enumerate(panels):
        draw_panel(fig.add_subplot(nrows, ncols, i + 1), columns, panel, smooth)
    fig.suptitle(f"{stage}: {csv_path}", fontsize=9)
    path = out / "dashboard.png"
    fig.savefig(path, dpi=dpi)
    written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(prog="python -m rlhf.plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a run directory, CSV version directory or metrics.csv")
    parser.add_argument("--out", default=None, help="output directory (default RUN_DIR/plots)")
    parser.add_argument("--stage", choices=sorted(PANELS), default=None, help="default: from the metrics")
    parser.add_argument("--smooth", type=int, default=5, help="moving-average window for training series")
    args = parser.parse_args(argv)
    written = render(args.run_dir, args.out, args.stage, args.smooth)
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    main(sys.argv[1:])
