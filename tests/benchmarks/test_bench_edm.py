"""benchmarks/bench_edm.py: the FLOP count of the paper's conditional CIFAR-10 network and
the timing helper (the full timed run takes about a minute, so it is not run here)."""
import importlib.util
import sys
from pathlib import Path

import pytest

from rdc_studio.core.edm_import import random_published_network

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_edm", ROOT / "benchmarks" / "bench_edm.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_conditional_network_costs_42_gflop_per_image(bench):
    net = random_published_network(bench.CONFIG)
    assert sum(p.numel() for p in net.parameters()) == 55_735_299
    assert bench.gflop_per_image(net, "cpu") == pytest.approx(42.4, abs=0.05)


def test_median_seconds_counts_every_call(bench):
    calls = []
    seconds = bench.median_seconds(lambda: calls.append(1), repeats=3, warmup=2)
    assert len(calls) == 5 and seconds >= 0.0
