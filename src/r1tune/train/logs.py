"""Where training metrics go: trainer_log.jsonl, TensorBoard events, and a loss plot."""

from __future__ import annotations

import json
from pathlib import Path

from r1tune.fileio import atomic_path, write_text_atomic


class MetricsLog:
    """Appends one JSON object per record to trainer_log.jsonl and mirrors scalars to TensorBoard."""

    def __init__(self, output_dir: Path, tensorboard: bool, start_step: int = 0, enabled: bool = True):
        self.path = output_dir / "trainer_log.jsonl"
        self.writer, self.enabled = None, enabled  # disabled: another process writes the log
        if tensorboard and enabled:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides events an interrupted run wrote after the resumed step
            self.writer = SummaryWriter(log_dir=str(output_dir / "runs"), purge_step=start_step or None)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        if self.writer is not None:
            step = record["step"]
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{record.get('split', 'train')}/{key}", value, step)

    def add_png(self, tag: str, png: Path, step: int) -> None:
        """Show a PNG written to disk (e.g. the update heatmap) in TensorBoard's Images tab too."""
        if self.writer is not None:
            import matplotlib.image

            self.writer.add_image(tag, matplotlib.image.imread(png)[..., :3], step, dataformats="HWC")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


LOG_FILE = "trainer_log.jsonl"
SAMPLES_FILE = "completions.jsonl"  # GRPO: sampled completions and their rewards, per logging step


def read_log(output_dir: Path, name: str = LOG_FILE) -> list[dict]:
    path = output_dir / name
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def truncate_log_after(output_dir: Path, step: int, name: str = LOG_FILE) -> None:
    """On resume, forget records logged after the checkpoint's step."""
    records = [r for r in read_log(output_dir, name) if r["step"] <= step]
    path = output_dir / name
    if path.exists():
        write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def plot_loss(output_dir: Path) -> Path | None:
    """training_loss.png: train loss per logged step, eval loss where measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_log(output_dir)
    train = [(r["step"], r["loss"]) for r in records if r.get("split") == "train"]
    evals = [(r["step"], r["loss"]) for r in records if r.get("split") == "eval" and "loss" in r]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("r1tune training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save_png(fig, output_dir / "training_loss.png")


def plot_rewards(output_dir: Path) -> Path | None:
    """reward_curve.png (GRPO): mean reward per logged step, total and per reward function, the held-out
    greedy reward where measured; below, completion length and the share cut at max_completion_length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_log(output_dir)
    train = [r for r in records if r.get("split") == "train" and "reward" in r]
    if not train:
        return None
    steps = [r["step"] for r in train]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    top.plot(steps, [r["reward"] for r in train], lw=2, label="reward (sampled)")
    for key in sorted({k for r in train for k in r if k.startswith("rewards/") and k.endswith("/mean")}):
        top.plot(*zip(*[(r["step"], r[key]) for r in train if key in r]), lw=1, alpha=0.8,
                 label=key.removeprefix("rewards/").removesuffix("/mean"))
    evals = [(r["step"], r["reward"]) for r in records if r.get("split") == "eval" and "reward" in r]
    if evals:
        top.plot(*zip(*evals), "o--", color="black", label="held-out reward (greedy)")
    top.set_ylabel("mean reward")
    top.set_title("r1tune GRPO")
    top.legend(fontsize=8)
    top.grid(alpha=0.3)
    bottom.plot(steps, [r.get("completions/mean_length", float("nan")) for r in train], label="mean completion length")
    bottom.set_ylabel("tokens")
    bottom.set_xlabel("step")
    bottom.grid(alpha=0.3)
    share = bottom.twinx()
    share.plot(steps, [r.get("completions/clipped_ratio", float("nan")) for r in train], color="tab:red",
               label="clipped ratio")
    share.plot(steps, [r.get("frac_reward_zero_std", float("nan")) for r in train], color="tab:gray",
               label="groups with equal rewards")
    share.set_ylim(-0.05, 1.05)
    share.set_ylabel("share")
    lines = bottom.get_legend_handles_labels()[0] + share.get_legend_handles_labels()[0]
    bottom.legend(lines, [line.get_label() for line in lines], fontsize=8, loc="upper left")
    return _save_png(fig, output_dir / "reward_curve.png")


def _save_png(fig, out: Path) -> Path:
    """Write a figure atomically (a crash never leaves half a PNG) and free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return out
