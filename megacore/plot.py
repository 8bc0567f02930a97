"""`megacore plot RUN_DIR`: PNG charts of a run's metrics.jsonl (loss and eval loss, lr, throughput)."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
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


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    out = Path(out) if out else Path(run_dir) / "loss.png"
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot(*series(records, "train", "loss"), label="train loss")
    axes[0].plot(*series(records, "val", "loss"), "o-", label="val loss")
    axes[0].set_ylabel("loss (nats/token)")
    axes[0].legend()
    axes[1].plot(*series(records, "train", "lr"))
    axes[1].set_ylabel("learning rate")
    axes[2].plot(*series(records, "train", "tokens_per_s"))
    axes[2].set_ylabel("tokens/s")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
