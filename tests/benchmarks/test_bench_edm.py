"""benchmarks/bench_edm.py: the FLOP count of the paper's conditional CIFAR-10 network and
the timing helper (the full timed run takes about a minute, so it is not run here)."""
from pathlib import Path

import pytest

from rdc_studio.core.edm_import import random_published_network

ROOT = Path(__file__).resolve().parents[2]


BENCHMARK = "bench_edm"  # loaded by the conftest's bench fixture


def test_conditional_network_costs_42_gflop_per_image(bench):
    net = random_published_network(bench.CONFIG)
    assert sum(p.numel() for p in net.parameters()) == 55_735_299
    assert bench.gflop_per_image(net, "cpu") == pytest.approx(42.4, abs=0.05)


def test_median_seconds_counts_every_call(bench):
    calls = []
    seconds = bench.median_seconds(lambda: calls.append(1), repeats=3, warmup=2)
    assert len(calls) == 5 and seconds >= 0.0


def test_stop_latency_stops_the_pass_between_network_calls(bench):
    """A stop requested right at the start ends the classification within its first calls
    (of one input each: a row's classes split), and leaves the network as it was."""
    import torch

    from rdc_studio.core.classifier import ClassifierSettings, DiffusionClassifier
    from rdc_studio.core.nets import NetConfig, build_denoiser

    net = build_denoiser(NetConfig(architecture="embedding", channels=(8, 16), emb_dim=32))
    clf = DiffusionClassifier(net, ClassifierSettings(steps=8), max_network_inputs=1)
    x = torch.rand(1, 1, 28, 28)
    stop = bench.stop_latency(clf, x, after=1e-6)
    assert stop["ended"] == "stopped" and stop["s_after_stop_request"] >= 0
    assert stop["network_calls"] < 8 * 10 and stop["inputs_per_call_max"] <= 1
    whole = bench.stop_latency(clf, x, after=3600)  # never reached: the whole pass, every call counted
    assert whole["ended"] == "finished before the request" and whole["s_after_stop_request"] is None
    assert whole["network_calls"] == 8 * 10 and whole["inputs_per_call_max"] == 1
    assert "denoise_labels" not in vars(net)
