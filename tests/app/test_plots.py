"""Live plots keep their axes steady, so a redraw does not re-lay out the tick labels."""
import numpy as np
import pytest

pytest.importorskip("pytestqt")
from rdc_studio.app.widgets.likelihood_plot import LikelihoodPlot  # noqa: E402
from rdc_studio.app.widgets.step_plot import StepPlot  # noqa: E402


def test_likelihood_plot_fixed_x_and_steady_y(qtbot):
    plot = LikelihoodPlot([str(k) for k in range(10)])
    qtbot.addWidget(plot)
    plot.reset(x_extent=16)
    rng = np.random.default_rng(0)
    lows = []
    for step in range(1, 17):
        plot.add_points([step], [rng.normal(scale=3.0, size=10)])
        (x0, x1), (y0, y1) = plot.viewRange()
        assert x0 <= 0 and 16 <= x1 < 17
        hist = np.stack(plot.history)
        rel = hist - hist.max(axis=1, keepdims=True)
        assert y0 <= rel.min() and y1 >= 0  # every point stays in view
        lows.append(y0)
    assert len(set(lows)) <= 4, "the y range should change only when the curves leave it"
    assert len(plot.steps) == 16 and plot.curves[0].getData()[0].size == 16


def test_likelihood_plot_batched_points_equal_single_points(qtbot):
    rng = np.random.default_rng(1)
    logits = [rng.normal(size=3) for _ in range(5)]
    one, many = LikelihoodPlot(["a", "b", "c"]), LikelihoodPlot(["a", "b", "c"])
    qtbot.addWidget(one)
    qtbot.addWidget(many)
    for i, row in enumerate(logits):
        one.add_point(i + 1, row)
    many.add_points(list(range(1, 6)), logits)
    for a, b in zip(one.curves, many.curves):
        assert np.array_equal(a.getData()[1], b.getData()[1])
    assert one._highlighted == many._highlighted == int(np.argmax(logits[-1]))


def test_step_plot_extend_and_reset(qtbot):
    plot = StepPlot("step", "loss", ["loss", "margin"])
    qtbot.addWidget(plot)
    plot.reset(x_extent=10)
    plot.extend("loss", [1, 2, 3], [0.5, 0.4, 0.3])
    plot.append("loss", 4, 0.2)
    assert plot.data["loss"] == ([1.0, 2.0, 3.0, 4.0], [0.5, 0.4, 0.3, 0.2])
    assert list(plot.curves["loss"].getData()[1]) == [0.5, 0.4, 0.3, 0.2]
    (x0, x1), _ = plot.viewRange()
    assert x0 <= 0 and 10 <= x1 < 11
    plot.reset()
    assert plot.data["loss"] == ([], [])


def test_probability_bars_label_every_class_and_offer_a_log_scale(qtbot):
    from rdc_studio.app.widgets.probability_bars import LOG_FLOOR, ProbabilityBars

    bars = ProbabilityBars([str(k) for k in range(10)])
    qtbot.addWidget(bars)
    p = np.full(10, 0.003 / 9)
    p[3] = 0.997
    bars.set_probabilities(p)
    texts = [label.toPlainText() for label in bars.labels]
    assert texts[3] == "99.7%" and all(t == "3e-04" for i, t in enumerate(texts) if i != 3)
    linear = bars.bars.opts["height"].copy()
    assert linear[0] < 0.001  # invisible on a linear axis ...
    bars.log_scale.setChecked(True)
    log_heights = np.asarray(bars.bars.opts["height"])
    assert log_heights[0] > 0.5 * log_heights[3]  # ... but clearly visible on the log axis
    assert bars.plot.viewRange()[1][0] <= np.log10(LOG_FLOOR)
    assert np.allclose(bars.heights, p)  # the probabilities themselves are unchanged
    bars.log_scale.setChecked(False)
    assert np.allclose(bars.bars.opts["height"], linear)


def test_class_palette_is_distinct_for_ten_classes():
    from rdc_studio.app.widgets.palette import CLASS_COLOURS, class_pen

    assert len(set(CLASS_COLOURS)) == 10
    styles = {class_pen(k).style() for k in range(10)}
    assert len(styles) == 2  # colour and dash differ between neighbouring halves


def test_x_ticks_cover_every_step(qtbot):
    from rdc_studio.app.widgets.plotting import integer_tick_spacing

    assert integer_tick_spacing(10) == 1 and integer_tick_spacing(500) == 50
    plot = StepPlot("step", "loss", ["objective"])
    qtbot.addWidget(plot)
    plot.resize(400, 200)
    plot.reset(x_extent=10)
    (x0, x1), _ = plot.viewRange()
    assert x0 <= 0 and x1 >= 10
    # a narrow plot with a grid still leaves room for the labels of step 0 and the last step
    from rdc_studio.app.widgets.plotting import EDGE_LABEL_PX

    narrow = StepPlot("step", "loss", ["estimate", "one draw"], faint=("one draw",), legend_below=True)
    qtbot.addWidget(narrow)
    narrow.resize(260, 200)
    narrow.show()
    qtbot.waitExposed(narrow)
    narrow.reset(x_extent=10)
    (x0, x1), _ = narrow.viewRange()
    px_per_step = narrow.getPlotItem().vb.width() / (x1 - x0)
    assert -x0 * px_per_step >= EDGE_LABEL_PX - 1 and (x1 - 10) * px_per_step >= EDGE_LABEL_PX - 1
    assert narrow.curves["one draw"].zValue() < narrow.curves["estimate"].zValue()


def test_a_legend_below_a_narrow_plot_stacks_instead_of_cutting_the_plot_off(qtbot):
    """Below a plot, the legend takes one row where it fits; in a narrow plot one entry per row,
    so the plot item never grows wider than its widget (the scene would cut off its right)."""
    plot = StepPlot("step", "diffusion loss (objective)", ["fixed-noise estimate", "one draw"],
                    faint=("one draw",), legend_below=True)
    qtbot.addWidget(plot)
    plot.show()
    qtbot.waitExposed(plot)
    for width, columns in [(600, 2), (240, 1), (600, 2)]:
        plot.resize(width, 260)
        qtbot.waitUntil(lambda: plot.getPlotItem().geometry().width() == plot.width())
        assert plot.legend.columnCount == columns
        assert plot.legend.boundingRect().width() <= plot.width()


def test_eliminated_classes_curves_end_where_they_were_last_measured(qtbot, tiny_net):
    """With progressive elimination the tab draws each eliminated class up to the screening
    levels only; the kept classes run to the end; the session keeps the classifier's logits."""
    import torch

    from rdc_studio.app.session_state import SessionState
    from rdc_studio.app.tabs.classify_tab import ClassifyTab
    from rdc_studio.core.classifier import ClassifierSettings, DiffusionClassifier

    settings = ClassifierSettings(steps=6, sigma_min=0.5, sigma_max=5.0, screen_levels=2, keep_classes=3)
    clf = DiffusionClassifier(tiny_net, settings)
    records = list(clf.stream(torch.rand(1, 1, 28, 28), levels_per_step=1))
    classes = [str(k) for k in range(10)]
    tab = ClassifyTab(SessionState(classes))
    qtbot.addWidget(tab)
    tab.begin(6)
    tab.show_records(records[:3])  # live flushes of any size draw the same curves
    tab.show_records(records[3:])
    kept = set(np.argsort(records[1].logits[0])[-3:].tolist())  # the leaders after the screening levels
    for k, curve in enumerate(tab.curves.curves):
        x, y = curve.getData()
        assert list(x) == [1, 2, 3, 4, 5, 6]
        if k in kept:
            assert np.isfinite(y).all()
        else:  # measured on the 2 screening levels, not drawn after them
            assert np.isfinite(y[:2]).all() and np.isnan(y[2:]).all()
    # the session (and its CSV export) keeps the classifier's own estimate for every class
    assert np.array_equal(tab.state.classification.logits[-1], records[-1].logits[0])
    assert np.isfinite(tab.state.classification.logits[-1]).all()
    # without elimination every curve runs to the end
    full = list(DiffusionClassifier(tiny_net, ClassifierSettings(steps=3)).stream(torch.rand(1, 1, 28, 28)))
    tab.begin(3)
    tab.show_records(full)
    assert all(np.isfinite(c.getData()[1]).all() and len(c.getData()[1]) == 3 for c in tab.curves.curves)


def test_a_lone_point_is_drawn_as_a_dot_and_fits_the_view(qtbot):
    """An attack of one iteration gives one point per curve: no line to draw, so a dot."""
    plot = StepPlot("iteration", "loss / margin", ["loss", "margin"])
    qtbot.addWidget(plot)
    plot.reset(x_extent=1)
    plot.extend("loss", [1], [8.99])
    plot.extend("margin", [1], [-8.78])
    assert plot.curves["loss"].opts["symbol"] == "o"
    plot.show()

    def fits() -> bool:
        low, high = plot.getViewBox().viewRange()[1]
        return low <= -8.78 and high >= 8.99

    qtbot.waitUntil(fits, timeout=30000)
    plot.extend("loss", [2], [7.0])
    assert plot.curves["loss"].opts["symbol"] is None  # a line from two points on
