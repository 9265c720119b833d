"""report/figures.py: each figure is drawn from plain data, without run directories, to a PNG
written whole (no temporary file left beside it), or returns None when it has nothing to draw."""

import math

import numpy as np
import pytest
from matplotlib.image import imread

from cptrain.report.figures import (
    Curves,
    bars_figure,
    curves_figure,
    heatmap_figure,
    ratio_figure,
    scaling_figure,
)
from cptrain.report.scaling import fit_power_law


def _drawn(path):
    """The PNG at ``path`` is the only file in its folder and not one flat colour."""
    assert path is not None and sorted(p.name for p in path.parent.iterdir()) == [path.name]
    img = imread(path)
    assert img.shape[0] > 50 and img.shape[1] > 50 and img[..., :3].std() > 0.01
    return img


def test_curves_are_drawn_per_panel_and_empty_panels_are_left_out(tmp_path):
    empty = Curves("nothing logged", {"en": ([], [])}, [10], ["en", "fr"])
    assert curves_figure([empty, Curves("none")], tmp_path / "a" / "c.png", ylabel="loss") is None
    assert not (tmp_path / "a").exists()
    full = Curves("sequential · tiny", {"en": ([0, 10, 20], [6.0, 3.0, 4.0]),
                                        "fr": ([0, 10, 20], [6.5, 6.4, 3.5])}, [10], ["en", "fr"])
    one = _drawn(curves_figure([full, empty], tmp_path / "b" / "c.png", ylabel="loss"))
    two = _drawn(curves_figure([full, full], tmp_path / "c" / "c.png", ylabel="loss", ncols=2))
    assert two.shape[1] > 1.5 * one.shape[1]  # a second panel beside the first


def test_bars_take_means_and_half_widths_and_survive_missing_values(tmp_path):
    assert bars_figure([], {"tiny": []}, tmp_path / "x.png", ylabel="y", title="t") is None
    assert bars_figure(["a"], {}, tmp_path / "x.png", ylabel="y", title="t") is None
    series = {"tiny": [(0.5, 0.1), (-0.2, math.nan)], "small": [(None, None), (0.3, 0.05)]}
    _drawn(bars_figure(["replay", "sequential"], series, tmp_path / "f" / "bars.png",
                       ylabel="forgetting", title="Forgetting"))


def test_scaling_needs_two_x_values_and_draws_the_fits(tmp_path):
    points = [{"group": "replay", "params": 1e6, "retained_loss": 5.0, "learned_loss": 4.0},
              {"group": "replay", "params": None, "retained_loss": 4.0, "learned_loss": 3.0}]
    y_keys = [("retained_loss", "retained"), ("learned_loss", "learned")]
    assert scaling_figure(points, {}, "params", y_keys, tmp_path / "x.png", xlabel="p") is None
    points[1]["params"] = 4e6
    points.append({"group": "sequential", "params": 2e6, "retained_loss": 5.5,
                   "learned_loss": None})
    fit = fit_power_law([1e6, 4e6], [5.0, 4.0])
    fits = {("params", "retained_loss"): {"replay": fit}}
    _drawn(scaling_figure(points, fits, "params", y_keys, tmp_path / "f" / "s.png",
                          xlabel="parameters", links=[points[:2]], order=["sequential"]))


def test_heatmaps_need_a_panel_and_take_nan_cells(tmp_path):
    assert heatmap_figure({"forgetting": {}}, ["k=5"], ["ε=0.1"], tmp_path / "x.png",
                          row_label="k", col_label="ε") is None
    means = np.array([[0.1, -0.3], [math.nan, 0.02]])
    sig = np.array([[False, True], [False, False]])
    grids = {"forgetting": {"lr=0.003": (means, sig)}, "retained": {"lr=0.003": (-means, sig)}}
    _drawn(heatmap_figure(grids, ["k=5", "k=20"], ["ε=0.1", "ε=0.9"], tmp_path / "f" / "h.png",
                          row_label="k", col_label="ε"))


@pytest.mark.parametrize("joint", [False, True])
def test_the_ratio_figure_draws_old_and_new_task_loss_against_alpha(tmp_path, joint):
    assert ratio_figure({}, tmp_path / "x.png") is None
    setting = {"old": [(0.0, 7.5, 0.1), (0.25, 7.0, math.nan), (0.5, None, 0.0)],
               "new": [(0.0, 6.0, 0.1), (0.25, 6.1, 0.1), (0.5, 6.2, 0.2)]}
    if joint:
        setting["joint"] = [(math.nan, 5.9, 0.05), (math.nan, 6.3, math.nan)]
    _drawn(ratio_figure({"tiny en→de": setting}, tmp_path / "f" / "r.png"))
