"""Compare training runs by their loss curves and throughput: is run B as good as run A (for example fp8 vs bf16)?

    python src/compare_runs.py logs-bf16 logs-fp8 [more runs] [--out compare.png] [--smooth 10]

Each argument is a run's log folder (the trainer's --log_dir) holding metrics.jsonl. Writes a PNG with two panels,
train loss (a trailing moving average over --smooth steps) and validation loss, both against tokens, one colour
per run, and prints a verdict: for each run after the first, its validation loss minus the first run's at the
last evaluation both have, the mean of that gap over the last 20% of the tokens both runs cover, and every run's
median tokens/s. Needs matplotlib for the plot (pip install matplotlib).

metrics.jsonl holds one JSON object per line: training steps {"step", "loss", "tokens", "tokens_per_second", ...},
evaluations {"step", "val_loss"}, and other records (checkpoints, restarts) that have neither, ignored here. A
step logged twice (a run resumed after a crash whose file was not cleaned) counts once, the last time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

LAST_FRACTION = 0.2  # the mean gap is taken over this last fraction of the tokens both runs cover
FIGURE_INCHES, FIGURE_DPI = (12, 4.5), 100  # a 1200 x 450 pixel PNG


class CompareError(Exception):
    """A bad input: main() prints it as one line and exits with code 2."""


@dataclass
class Run:
    """One run's curves, each step once (its last record)."""
    name: str
    train: dict[int, dict]  # step -> training record
    val_loss: dict[int, float]  # step -> validation loss
    tokens_per_step: int

    def tokens(self, step: int) -> int:
        """Tokens seen after optimizer step `step`."""
        return step * self.tokens_per_step

    def val_by_tokens(self) -> dict[int, float]:
        """{tokens seen: validation loss} of each evaluation."""
        return {self.tokens(step): loss for step, loss in self.val_loss.items()}

    def covered_tokens(self) -> int:
        """Tokens the run got through: its last training step's (evaluations follow a training step)."""
        return self.tokens(max(self.train))


def load_run(folder: str, name: str) -> Run:
    """Read <folder>/metrics.jsonl; CompareError if it is missing or holds no training records."""
    path = Path(folder)
    if not path.is_dir():
        raise CompareError(f"{folder} is not a folder; pass the log folders (the trainer's --log_dir) of the runs")
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        raise CompareError(f"{folder} has no metrics.jsonl; is it a run's --log_dir?")
    train, val_loss, unreadable = {}, {}, 0
    for line in metrics.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a crash
            unreadable += 1
            continue
        if not isinstance(record, dict) or "step" not in record:
            continue
        if "val_loss" in record:
            val_loss[record["step"]] = record["val_loss"]
        elif "loss" in record:
            train[record["step"]] = record
    if unreadable:
        print(f"note: {metrics}: skipped {unreadable} unreadable line(s)", file=sys.stderr)
    usable = [r for r in train.values() if r["step"] > 0 and "tokens" in r]
    if not usable:
        raise CompareError(f"{metrics} has no training records (lines with step, loss and tokens); "
                           "did the run train at least one step?")
    tokens_per_step = usable[-1]["tokens"] // usable[-1]["step"]
    return Run(name, train, val_loss, tokens_per_step)


def run_names(folders: list[str]) -> list[str]:
    """Folder names; the paths as given when two folders share a name; numbered when a folder is given twice."""
    for names in ([Path(f).resolve().name for f in folders], list(folders)):
        if len(set(names)) == len(names):
            return names
    return [f"{f} #{i + 1}" for i, f in enumerate(folders)]


def smoothed(values: list[float], window: int) -> list[float]:
    """Trailing moving average: each point is the mean of itself and up to window - 1 points before it."""
    return [statistics.fmean(values[max(0, i + 1 - window):i + 1]) for i in range(len(values))]


def compare(reference: Run, run: Run) -> dict:
    """run's validation loss minus reference's: at the last evaluation both have (matched by tokens, i.e. by step
    when both use the same batch), and averaged over the evaluations both have in the last 20% of the tokens that
    both runs covered. None where they share no evaluation."""
    ref_val, val = reference.val_by_tokens(), run.val_by_tokens()
    common = sorted(set(ref_val) & set(val))
    result = dict(last_tokens=None, last_step=None, last_gap=None, mean_gap=None, mean_gap_evals=0,
                  window_tokens=None)
    if not common:
        return result
    last = common[-1]
    covered = min(reference.covered_tokens(), run.covered_tokens())
    start = covered - LAST_FRACTION * covered
    window = [t for t in common if start <= t <= covered]
    result.update(last_tokens=last, last_step=last // reference.tokens_per_step,
                  last_gap=val[last] - ref_val[last], window_tokens=(start, covered), mean_gap_evals=len(window))
    if window:
        result["mean_gap"] = statistics.fmean(val[t] - ref_val[t] for t in window)
    return result


def median_tokens_per_second(run: Run) -> float | None:
    """The run's median training throughput (None if it logged none)."""
    rates = [r["tokens_per_second"] for r in run.train.values() if "tokens_per_second" in r]
    return statistics.median(rates) if rates else None


def verdict_lines(runs: list[Run], speeds: dict[str, float | None], gaps: dict[str, dict]) -> list[str]:
    """The comparison in words: which run is ahead on validation loss at equal tokens, and by how much."""
    reference = runs[0]
    lines = []
    for run in runs:
        speed = speeds[run.name]
        speed_text = "no tokens/s recorded" if speed is None else f"median {speed:,.0f} tokens/s"
        if run is not reference and speed is not None and speeds[reference.name]:
            speed_text += f" ({speed / speeds[reference.name]:.2f}x {reference.name})"
        last = max(run.train)
        lines.append(f"{run.name}: {last} steps, {run.tokens(last):,} tokens, {speed_text}"
                     + (" (reference)" if run is reference else ""))
        if run is reference:
            continue
        gap = gaps[run.name]
        if gap["last_gap"] is None:
            lines.append(f"  no evaluation at the same tokens as {reference.name}: no validation comparison")
            continue
        t = gap["last_tokens"]
        lines.append(f"  val loss at step {gap['last_step']} ({t:,} tokens): {run.val_by_tokens()[t]:.4f} vs "
                     f"{reference.val_by_tokens()[t]:.4f}, gap {gap['last_gap']:+.4f} ({run.name} - {reference.name}): "
                     f"{in_words(run.name, reference.name, gap['last_gap'])}")
        start, end = gap["window_tokens"]
        if gap["mean_gap"] is None:
            lines.append(f"  no common evaluation in the last 20% of the tokens ({start:,.0f}-{end:,} tokens)")
        else:
            lines.append(f"  mean val gap over the last 20% of the tokens ({start:,.0f}-{end:,} tokens, "
                         f"{gap['mean_gap_evals']} evaluation(s)): {gap['mean_gap']:+.4f}: "
                         f"{in_words(run.name, reference.name, gap['mean_gap'])}")
    return lines


def in_words(name: str, reference: str, gap: float) -> str:
    """A validation-loss gap (run minus reference) said so that its sign cannot be misread."""
    if gap == 0:
        return f"{name} and {reference} are level"
    return f"{name} is {abs(gap):.4f} {'below (better than)' if gap < 0 else 'above (worse than)'} {reference}"


def plot(runs: list[Run], out: Path, window: int) -> None:
    """Two panels against tokens: smoothed train loss, validation loss."""
    try:
        import matplotlib
    except ImportError:
        raise CompareError("the plot needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, (train_ax, val_ax) = plt.subplots(1, 2, figsize=FIGURE_INCHES, dpi=FIGURE_DPI)
    for i, run in enumerate(runs):
        colour = f"C{i % 10}"
        steps = sorted(run.train)
        tokens = [run.train[s].get("tokens", run.tokens(s)) for s in steps]
        train_ax.plot(tokens, smoothed([run.train[s]["loss"] for s in steps], window), color=colour, label=run.name)
        if run.val_loss:
            val_steps = sorted(run.val_loss)
            val_ax.plot([run.tokens(s) for s in val_steps], [run.val_loss[s] for s in val_steps], color=colour,
                        marker="o", markersize=3, label=run.name)
    train_ax.set_title(f"train loss (moving average of {window} steps)" if window > 1 else "train loss")
    val_ax.set_title(f"validation loss (reference: {runs[0].name})")
    for ax in (train_ax, val_ax):
        ax.set_xlabel("tokens")
        ax.set_ylabel("loss")
        ax.ticklabel_format(axis="y", useOffset=False)  # losses as they are, not as offsets from 10.82
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    """Compare the runs, print the verdict, write the plot; returns the numbers. Exits 2 on a bad input."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="log folders (the trainer's --log_dir); the first is the reference")
    parser.add_argument("--out", default="compare.png", help="the PNG to write (default compare.png)")
    parser.add_argument("--smooth", type=int, default=10, help="train-loss moving-average window in steps (1: raw)")
    args = parser.parse_args(argv)
    try:
        if args.smooth < 1:
            raise CompareError(f"--smooth must be 1 or more, got {args.smooth}")
        runs = [load_run(folder, name) for folder, name in zip(args.runs, run_names(args.runs))]
        speeds = {run.name: median_tokens_per_second(run) for run in runs}
        gaps = {run.name: compare(runs[0], run) for run in runs[1:]}
        print("\n".join(verdict_lines(runs, speeds, gaps)))
        plot(runs, Path(args.out), args.smooth)
    except CompareError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    print(f"plot: {args.out}")
    return dict(reference=runs[0].name, median_tokens_per_second=speeds, gaps=gaps, out=args.out)


if __name__ == "__main__":
    main()
