"""The loss-curve PNG (megatron_patch.training.loss_curve): the values read back from a run's
TensorBoard events are the ones the trainer's writer logged, and the picture is drawn."""
from __future__ import annotations

import math
import os

from megatron_patch.training import loss_curve


def _events(d, train, valid):
    from torch.utils.tensorboard import SummaryWriter  # what TrainLogger writes with
    w = SummaryWriter(str(d))
    for step, v in train.items():
        w.add_scalar("lm loss", v, step)
    for step, v in valid.items():
        w.add_scalar("lm loss validation", v, step)
    w.close()


def test_png_from_a_runs_events(tmp_path, capsys):
    train = {i: 10.0 * math.exp(-0.1 * i) for i in range(1, 31)}
    valid = {10: 4.0, 20: 1.5}
    run = tmp_path / "tensorboard" / "pretrain-run_2026"
    _events(run, train, valid)
    got = loss_curve.read_scalars(str(run))
    assert got["lm loss"].keys() == train.keys()
    assert all(abs(got["lm loss"][k] - v) < 1e-5 * v for k, v in train.items())  # float32
    assert got["lm loss validation"] == valid
    # the folder holding the one run is accepted too; the PNG lands in the run's folder
    assert loss_curve.main([str(tmp_path / "tensorboard")]) == 0
    png = run / "loss_curve.png"
    assert f"loss curve (30 iterations, with validation) -> {png}" in capsys.readouterr().out
    import matplotlib.image
    img = matplotlib.image.imread(str(png))
    assert img.shape[:2] == (400, 700)  # figsize 7x4 at 100 dpi
    assert (img[..., :3] < 0.5).any()  # something was drawn on the white canvas
    assert [n for n in os.listdir(run) if ".tmp" in n] == []


def test_no_events_is_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert loss_curve.main([str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"loss_curve: error: {tmp_path / 'empty'}: no TensorBoard event files"]
