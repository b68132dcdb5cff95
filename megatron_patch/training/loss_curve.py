"""A PNG of a training run's loss curve, read from its TensorBoard event files.

    python -m megatron_patch.training.loss_curve TENSORBOARD_DIR [--out FILE.png]

TENSORBOARD_DIR is a run's folder under OUTPUT_BASEPATH/tensorboard (or that folder, when it
holds exactly one run). Plots "lm loss" per iteration and, when the run evaluated,
"lm loss validation"; writes TENSORBOARD_DIR/loss_curve.png unless --out says otherwise.
Needs matplotlib (pip install -e '.[plot]'); reading the events uses tensorboard, a
dependency of the trainer already.
"""
from __future__ import annotations

import os
import sys
from typing import Dict

from megatron_patch.cli_args import OneLineErrors

TRAIN, VALID = "lm loss", "lm loss validation"


class CurveError(ValueError):
    pass


def run_dir(path: str) -> str:
    """``path`` itself when it holds event files, else its only sub-folder that does."""
    def has_events(d):
        return any(n.startswith("events.out.tfevents") for n in os.listdir(d))
    if not os.path.isdir(path):
        raise CurveError(f"{path}: no such directory")
    if has_events(path):
        return path
    runs = [os.path.join(path, n) for n in sorted(os.listdir(path))
            if os.path.isdir(os.path.join(path, n)) and has_events(os.path.join(path, n))]
    if len(runs) != 1:
        raise CurveError(f"{path}: " + ("no TensorBoard event files" if not runs else
                                        f"{len(runs)} runs; give one of them"))
    return runs[0]


def read_scalars(tb_dir: str) -> Dict[str, Dict[int, float]]:
    """{tag: {step: value}} of the loss tags present in the run's event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(tb_dir, size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags().get("scalars", []))
    out = {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in (TRAIN, VALID)
           if tag in tags}
    if not out.get(TRAIN):
        raise CurveError(f"{tb_dir}: no '{TRAIN}' values (has the run logged an iteration?)")
    return out


def plot(curves: Dict[str, Dict[int, float]], out: str, title: str = "") -> str:
    """Write the PNG (atomically: a temporary name, then rename)."""
    try:
        import matplotlib
    except ImportError:
        raise CurveError("plotting needs matplotlib: pip install -e '.[plot]'") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for tag, style in ((TRAIN, "-"), (VALID, "o--")):
        if tag in curves:
            steps = sorted(curves[tag])
            ax.plot(steps, [curves[tag][s] for s in steps], style,
                    label="validation" if tag == VALID else "training")
    ax.set_xlabel("iteration")
    ax.set_ylabel("lm loss")
    ax.set_title(title, fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = f"{out}.tmp{os.getpid()}.png"
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, out)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
    return out


def main(argv=None) -> int:
    p = OneLineErrors(prog="loss_curve", description=__doc__.splitlines()[0])
    p.add_argument("tensorboard_dir")
    p.add_argument("--out", default=None, help="PNG path (default: <run dir>/loss_curve.png)")
    a = p.parse_args(argv)
    from megatron_patch.fsutil import os_error_message
    try:
        d = run_dir(a.tensorboard_dir)
        curves = read_scalars(d)
        out = plot(curves, a.out or os.path.join(d, "loss_curve.png"), os.path.basename(d))
    except CurveError as e:
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"{p.prog}: error: {os_error_message(e)}", file=sys.stderr)
        return 2
    n = len(curves[TRAIN])
    print(f"loss curve ({n} iterations{', with validation' if VALID in curves else ''}) -> "
          f"{out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
