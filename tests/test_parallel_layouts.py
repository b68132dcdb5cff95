"""Parallel layouts at launcher level, several dimensions at once: every layout trains the
same 8-layer model (fp32, 4 iterations, GBS 4) through the real 25-argument command and
must give the TP=1/PP=1/DP=1 run's loss at every iteration (1e-5 relative) and its weights
after the last step (checkpoints merged to TP=1/PP=1 by the converter's reader).

This file: DP2xPP2, TP2xDP2 with the distributed optimizer, PP2xVP2xDP2, TP2xPP2 with SP,
PP4 with an uneven first stage, TP4. test_parallel_layouts_resume.py: TP2xPP2, the
8-process TP2xPP2xDP2 with DO, re-sharding resume from those two, and ENV=dlc (the matrix
itself, the reference and the comparison: tests/layout_matrix.py).
"""
from __future__ import annotations

import pytest

import layout_matrix as M
from layout_matrix import lw, reference, runs  # noqa: F401  (module fixtures)

pytestmark = pytest.mark.slow  # multi-process / end-to-end

# the other layouts run in test_parallel_layouts_resume.py, next to the resumes they feed
LOCAL = ["dp2_pp2", "tp2_dp2_do", "pp2_vp2_dp2", "tp2_pp2_sp", "pp4_uneven", "tp4"]
assert set(LOCAL) < set(M.LAYOUTS)


@pytest.mark.parametrize("name", LOCAL)
def test_layout_equals_tp1(runs, reference, lw, name):
    M.check_layout(runs, reference, lw, name)
