"""`megacore plot RUN_DIR`: PNG charts of a run's metrics.jsonl (loss and eval loss, lr, throughput)."""

from __future__ import annotations

import json
from pathlib import Path

from megacore.run_dir import METRICS, PLOT


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / METRICS
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir}")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    # After a resume, steps past the checkpoint are logged again: the later record wins.
    latest: dict[tuple[str, int], dict] = {}
    for r in records:
        latest[r["kind"], r["step"]] = r
    return sorted(latest.values(), key=lambda r: (r["kind"], r["step"]))


def series(records: list[dict], kind: str, key: str) -> tuple[list[int], list[float]]:
    rows = [r for r in records if r["kind"] == kind and key in r]
    return [r["step"] for r in rows], [r[key] for r in rows]


CHARTS = [("loss (nats/token)", [("train", "loss", "train loss"), ("val", "loss", "val loss")]),
          ("learning rate", [("train", "lr", "lr")]),
          ("tokens/s", [("train", "tokens_per_s", "tokens/s")])]


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the charts; the PNG also carries the plotted points (read back from the drawn lines) as
    JSON in its `megacore:series` text chunk, so what was drawn can be checked against metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    out = Path(out) if out else Path(run_dir) / PLOT
    schedule = _schedule(run_dir)
    tasks = sorted({r["kind"] for r in records if r["kind"].startswith("eval/") and "acc" in r})
    charts = CHARTS + ([("downstream accuracy", [(kind, "acc", f"{kind[5:]} acc") for kind in tasks])] if tasks else [])
    fig, axes = plt.subplots(1, len(charts), figsize=(5 * len(charts), 4))
    for ax, (ylabel, lines) in zip(axes, charts):
        for kind, key, label in lines:
            if key == "lr" and schedule:
                label = f"lr ({schedule})"
            ax.plot(*series(records, kind, key), "-" if kind == "train" else "o-", label=label)
        ax.set_ylabel(ylabel)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(lines) > 1 or schedule and ylabel == "learning rate":
            ax.legend()
    drawn = {line.get_label(): [[float(x) for x in line.get_xdata()], [float(y) for y in line.get_ydata()]]
             for ax in axes for line in ax.get_lines()}
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    fig.savefig(out, dpi=100, metadata={"megacore:series": json.dumps(drawn)})
    plt.close(fig)
    return out


def _schedule(run_dir: str | Path) -> str | None:
    """The run's learning-rate schedule as the chart names it ("wsd, 1-sqrt decay over 200 steps")."""
    from megacore.run_dir import CONFIG, load_run_config

    if not (Path(run_dir) / CONFIG).is_file():
        return None
    cfg = load_run_config(run_dir)
    opt = cfg.optim
    if opt.schedule != "wsd":
        return opt.schedule
    from megacore.train.optim import wsd_decay_steps

    return f"wsd, {opt.decay_shape} decay over the last {wsd_decay_steps(opt, cfg.train.steps)} steps"
