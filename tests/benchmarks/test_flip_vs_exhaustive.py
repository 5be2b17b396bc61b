"""benchmarks/flip_vs_exhaustive.py: the exhaustive search is exact, and the comparison runs."""
import sys
from pathlib import Path

import torch

from rdc_studio.core.attacks import flippable_pixels, margin_of

ROOT = Path(__file__).resolve().parents[2]


BENCHMARK = "flip_vs_exhaustive"  # loaded by the conftest's bench fixture


def test_problems_have_the_asked_reach_and_the_search_is_exhaustive(bench):
    model, x = bench.random_problem(3, examples=3, flippable=5)
    reach, value = flippable_pixels(x, 0.3, 0.5)
    assert reach.flatten(1).sum(1).tolist() == [5, 5, 5]
    with torch.no_grad():
        y = model(x).argmax(1)
    lowest = bench.exhaustive_margins(model, x, y, 0.3)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        assert torch.all(lowest <= margin_of(model(x), y))  # the clean image is one of the sets (no flips)
    for k in range(3):  # no random set of flips goes below the exhaustive minimum
        pixels = reach[k].flatten().nonzero()[:, 0]
        for _ in range(40):
            z = x[k].flatten().clone()
            chosen = pixels[torch.rand(len(pixels), generator=g) < 0.5]
            z[chosen] = value[k].flatten()[chosen]
            with torch.no_grad():
                assert float(margin_of(model(z.view(1, *x.shape[1:])), y[k:k + 1])) >= float(lowest[k]) - 1e-5
    shifted = bench.ShiftedTrueClass(model, 2, 1.5)
    with torch.no_grad():
        assert torch.allclose(shifted(x)[:, 2], model(x)[:, 2] + 1.5) and torch.equal(shifted(x)[:, 0], model(x)[:, 0])


def test_the_comparison_runs_and_finds_no_impossible_break(bench, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["flip_vs_exhaustive.py", "--models", "1", "--examples", "4", "--flippable", "6",
                                      "--steps", "10"])
    bench.main()
    out = capsys.readouterr().out
    assert "instances (1 random CNNs x 4 images, 6 flippable pixels" in out and "(a bug)" not in out
    assert "of the largest possible margin drop on average" in out


def test_restarts_never_reach_less_than_one_start(bench, monkeypatch, capsys):
    """The best of several starts includes the first (the clean image), so the average share
    of the optimal margin drop cannot fall."""
    shares = {}
    for restarts in (1, 3):
        monkeypatch.setattr(sys, "argv", ["flip_vs_exhaustive.py", "--models", "2", "--examples", "4", "--flippable",
                                          "8", "--steps", "6", "--restarts", str(restarts)])
        bench.main()
        out = capsys.readouterr().out
        assert ("3 starts" in out) == (restarts == 3) and "(a bug)" not in out
        shares[restarts] = float(out.split("it reached ")[1].split("%")[0])
    assert shares[3] >= shares[1]
