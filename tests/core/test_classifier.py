import numpy as np
import pytest
import torch

from rdc_studio.core.classifier import ClassifierSettings, DiffusionClassifier, classify_batches
from rdc_studio.core.diffusion import to_model_space


@pytest.fixture
def images():
    g = torch.Generator().manual_seed(3)
    return torch.rand(4, 1, 28, 28, generator=g)


def test_logits_shape_and_determinism(tiny_net, images):
    clf = DiffusionClassifier(tiny_net, ClassifierSettings(steps=6, noise_seed=1))
    with torch.no_grad():
        a, b = clf(images), clf(images)
    assert a.shape == (4, 10)
    assert torch.equal(a, b)
    again = DiffusionClassifier(tiny_net, ClassifierSettings(steps=6, noise_seed=1))
    with torch.no_grad():
        assert torch.allclose(again(images), a)
        other = DiffusionClassifier(tiny_net, ClassifierSettings(steps=6, noise_seed=2))(images)
    assert not torch.allclose(other, a)


def test_randomized_mode_uses_explicit_generator(tiny_net, images):
    s = ClassifierSettings(steps=4, mode="randomized")
    c1 = DiffusionClassifier(tiny_net, s, generator=torch.Generator().manual_seed(5))
    c2 = DiffusionClassifier(tiny_net, s, generator=torch.Generator().manual_seed(5))
    global_state = torch.random.get_rng_state()
    with torch.no_grad():
        a1, a2 = c1(images), c1(images)
        b1 = c2(images)
    assert not torch.allclose(a1, a2)  # fresh noise every call
    assert torch.equal(a1, b1)  # reproducible from the generator
    assert torch.equal(torch.random.get_rng_state(), global_state)  # global RNG untouched


def test_logits_equal_weighted_sum_with_shared_noise(tiny_net, images):
    """Recompute the logits by hand: the same noise for every class, one pass per class."""
    clf = DiffusionClassifier(tiny_net, ClassifierSettings(steps=3, noise_seed=0))
    x0 = to_model_space(images)
    expected = torch.zeros(4, 10)
    with torch.no_grad():
        for i in range(3):
            s = clf.sigmas[i]
            noisy = x0 + s * clf.noise_bank[i]
            for y in range(10):
                d = tiny_net.denoise(noisy, s.repeat(4), heads=[y])[:, 0]
                expected[:, y] -= clf.weights[i] * (d - x0).pow(2).flatten(1).sum(1)
        got = clf(images)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-3)


def test_per_class_mode_matches_multihead(tiny_net, images):
    clf = DiffusionClassifier(tiny_net, ClassifierSettings(steps=3))
    with torch.no_grad():
        assert torch.allclose(clf(images), clf(images, per_class=True), rtol=1e-4, atol=1e-3)


def test_chunked_levels_match_one_pass(tiny_net, images):
    one = DiffusionClassifier(tiny_net, ClassifierSettings(steps=5))
    chunked = DiffusionClassifier(tiny_net, ClassifierSettings(steps=5, levels_per_pass=2))
    with torch.no_grad():
        assert torch.allclose(one(images), chunked(images), rtol=1e-4, atol=1e-3)


def test_streaming_form_equals_one_shot(tiny_net, images):
    clf = DiffusionClassifier(tiny_net, ClassifierSettings(steps=5))
    steps = list(clf.stream(images, levels_per_step=2))
    assert [s.levels_done for s in steps] == [2, 4, 5]
    assert steps[0].level_errors.shape == (4, 2, 10)
    with torch.no_grad():
        full = clf(images).numpy()
    assert np.allclose(steps[-1].logits, full, rtol=1e-4, atol=1e-3)
    assert np.allclose(steps[-1].probabilities.sum(1), 1.0, atol=1e-5)
    # the running estimate is rescaled to the full mass: the first step holds levels 0 and 4
    assert list(steps[0].sigmas_done) == pytest.approx([float(clf.sigmas[0]), float(clf.sigmas[4])])
    first = -steps[0].level_errors.sum(1) * float(clf.weights[0]) * 5 / 2
    assert np.allclose(steps[0].logits, first, rtol=1e-4, atol=1e-3)


def test_interleaved_order_is_a_spread_permutation():
    from rdc_studio.core.classifier import interleaved_order

    assert interleaved_order(8) == [0, 4, 2, 6, 1, 5, 3, 7]
    for t in (1, 5, 16, 125):
        order = interleaved_order(t)
        assert sorted(order) == list(range(t))
        if t >= 5:
            assert max(order[:2]) >= t // 2  # the first two levels span both halves


def test_stream_cancellation_stops_early(tiny_net, images):
    clf = DiffusionClassifier(tiny_net, ClassifierSettings(steps=6))
    calls = {"n": 0}

    def cancelled():
        calls["n"] += 1
        return calls["n"] > 2

    assert len(list(clf.stream(images, 1, cancelled))) == 2


def test_gradients_flow_to_input(tiny_net, images):
    clf = DiffusionClassifier(tiny_net, ClassifierSettings(steps=2))
    x = images.clone().requires_grad_(True)
    clf(x)[:, 3].sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_classify_batches_covers_all(tiny_net):
    clf = DiffusionClassifier(tiny_net, ClassifierSettings(steps=2))
    imgs = torch.rand(7, 1, 28, 28)
    out = list(classify_batches(clf, imgs, batch_size=3))
    assert [i for i, _ in out] == [0, 3, 6] and sum(l.shape[0] for _, l in out) == 7


def test_settings_validation():
    with pytest.raises(ValueError):
        ClassifierSettings(mode="sometimes")
    with pytest.raises(ValueError):
        ClassifierSettings(steps=0)


@pytest.fixture(params=["multihead", "embedding"])
def any_net(request, tiny_net):
    if request.param == "multihead":
        return tiny_net
    from rdc_studio.core.nets import NetConfig, build_denoiser

    torch.manual_seed(1)
    net = build_denoiser(NetConfig(architecture="embedding", channels=(8, 16), emb_dim=32))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return net.eval()


def test_progressive_elimination_keeps_the_leaders_exact(any_net, images):
    """Kept classes get the full quadrature, eliminated ones their (shifted) screening estimate."""
    full = DiffusionClassifier(any_net, ClassifierSettings(steps=8, noise_seed=4))
    screen_only = DiffusionClassifier(any_net, ClassifierSettings(steps=8, noise_seed=4))
    pruned = DiffusionClassifier(any_net, ClassifierSettings(steps=8, noise_seed=4, screen_levels=4, keep_classes=3))
    assert pruned.settings.eliminates
    with torch.no_grad():
        exact = full(images)
        # the screening estimate: the first 4 levels in visiting order, rescaled to the full mass
        _, screened, _ = next(iter(screen_only._passes(images, screen_only.noise_bank, 4)))
        out = pruned(images)
    kept = screened.topk(3, dim=1).indices
    # eliminated classes: the screening estimate moved by the kept classes' smallest change
    offset = (exact.gather(1, kept) - screened.gather(1, kept)).min(dim=1).values
    for i in range(images.shape[0]):
        for c in range(10):
            if c in kept[i]:
                assert torch.allclose(out[i, c], exact[i, c], rtol=1e-5, atol=1e-3), (i, c)
            else:
                assert torch.allclose(out[i, c], screened[i, c] + offset[i], rtol=1e-5, atol=1e-3), (i, c)
                assert out[i, c] <= out[i, kept[i]].min() + 1e-4  # never above a kept class
    # the stream ends where forward ends, and marks eliminated classes' errors as NaN
    steps = list(pruned.stream(images, levels_per_step=3))
    assert [s.levels_done for s in steps] == [3, 4, 7, 8]
    assert np.allclose(steps[-1].logits, out.numpy(), rtol=1e-5, atol=1e-3)
    assert np.isnan(steps[-1].level_errors).sum() == images.shape[0] * 1 * 7
    assert not np.isnan(steps[0].level_errors).any()


def test_elimination_ranks_the_logits_with_the_prior_so_the_prior_favourite_is_kept_and_leads(any_net, images):
    """The classes kept are the leaders of the output (prior included): a class the prior
    makes the winner is measured in full, and no eliminated class ends above a kept one."""
    settings = ClassifierSettings(steps=8, noise_seed=4, screen_levels=4, keep_classes=2)
    without = DiffusionClassifier(any_net, ClassifierSettings(steps=8, noise_seed=4))
    with torch.no_grad():
        logits = without(images)  # the full quadrature, no prior
    last = logits.argmin(1)  # each image's least likely class without a prior
    out = []
    for i in range(images.shape[0]):
        favoured = torch.zeros(10)
        favoured[last[i]] = float(logits[i].max() - logits[i].min()) + 5  # enough to win
        clf = DiffusionClassifier(any_net, settings, log_prior=favoured)
        full = DiffusionClassifier(any_net, ClassifierSettings(steps=8, noise_seed=4), log_prior=favoured)
        with torch.no_grad():
            got, exact = clf(images[i:i + 1])[0], full(images[i:i + 1])[0]
        out.append(int(got.argmax()))
        assert torch.allclose(got[last[i]], exact[last[i]], rtol=1e-5, atol=1e-3)  # kept: the full quadrature
    assert out == last.tolist()


def test_progressive_elimination_is_differentiable_and_validated(tiny_net, images):
    clf = DiffusionClassifier(tiny_net, ClassifierSettings(steps=6, screen_levels=2, keep_classes=2))
    x = images.clone().requires_grad_(True)
    clf(x).logsumexp(1).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert not ClassifierSettings(steps=6, screen_levels=6, keep_classes=2).eliminates
    assert not ClassifierSettings(steps=6, screen_levels=2, keep_classes=0).eliminates
    with pytest.raises(ValueError, match="exceeds"):
        ClassifierSettings(steps=4, screen_levels=5, keep_classes=2)


@pytest.mark.parametrize("elimination", [False, True])
@pytest.mark.parametrize("limit", [12, 3])
def test_input_limit_bounds_every_network_call_and_changes_nothing(any_net, images, elimination, limit):
    """A small input limit splits the network calls (checkpointed under autograd) exactly;
    below K (10 classes) the class-embedding network's calls split a row by class."""
    extra = dict(screen_levels=3, keep_classes=2) if elimination else {}
    settings = ClassifierSettings(steps=6, noise_seed=2, **extra)
    calls: dict[str, list[int]] = {"whole": [], "limited": []}
    grads, logits = {}, {}
    for name, limit in (("whole", 10_000), ("limited", limit)):
        clf = DiffusionClassifier(any_net, settings, max_network_inputs=limit)
        hook = any_net.conv_in.register_forward_pre_hook(lambda mod, args, name=name: calls[name].append(args[0].shape[0]))
        try:
            x = images.clone().requires_grad_(True)
            out = clf(x)
            (grads[name],) = torch.autograd.grad(out.logsumexp(1).sum() - out[:, 3].sum(), x)
            logits[name] = out.detach()
        finally:
            hook.remove()
    assert torch.allclose(logits["whole"], logits["limited"], rtol=1e-5, atol=1e-4)
    # equal up to float32 summation order (chunked convolutions reduce in another order)
    scale = float(grads["whole"].abs().max())
    assert torch.allclose(grads["whole"], grads["limited"], rtol=1e-3, atol=1e-3 * scale)
    assert grads["limited"].abs().sum() > 0
    # one call per phase for the whole batch; the limited classifier splits them, and none
    # of its calls (the recomputation in the backward pass included) exceeds the limit
    assert len(calls["whole"]) == (2 if elimination else 1) and max(calls["whole"]) > 12
    assert max(calls["limited"]) <= limit
    assert sum(calls["limited"]) > sum(calls["whole"])  # the checkpointed chunks ran again


def test_input_limit_is_validated(tiny_net):
    with pytest.raises(ValueError, match="at least 1"):
        DiffusionClassifier(tiny_net, ClassifierSettings(steps=2), max_network_inputs=0)
    default = DiffusionClassifier(tiny_net, ClassifierSettings(steps=2))
    assert default.network_input_limit() == 160 and default.network_input_limit(gradients=True) == 64
    assert default.activation_limit() == 512
    limited = DiffusionClassifier(tiny_net, ClassifierSettings(steps=2), max_network_inputs=9)
    assert limited.network_input_limit(True) == 9 and limited.activation_limit() == 9


class NetworkCalls:
    """Counts the network calls (forward, and backward through the input convolution) of a net."""

    def __init__(self, net) -> None:
        self.forward = self.backward = 0
        self._handles = [
            net.conv_in.register_forward_pre_hook(lambda *_: self._count("forward")),
            net.conv_in.register_full_backward_pre_hook(lambda *_: self._count("backward")),
        ]

    def _count(self, kind: str) -> None:
        setattr(self, kind, getattr(self, kind) + 1)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


@pytest.mark.parametrize("checkpointed", [False, True])
def test_a_stop_request_ends_a_pass_between_network_calls(any_net, images, monkeypatch, checkpointed):
    """Inside a cancellation scope the classifier polls before every network call and every
    call's backward pass (also in checkpointed segments), so a stop ends the pass there."""
    import rdc_studio.core.classifier as classifier_module
    from rdc_studio.core.runtime import OperationCancelled, cancellation_scope

    # calls of 10 inputs (multi-head: 10 (image, level) rows; embedding: one row, all
    # classes), in checkpointed segments of 20 inputs or in one plain segment
    monkeypatch.setitem(classifier_module.MAX_GRADIENT_CALL_INPUTS, "cpu", 10)
    monkeypatch.setitem(classifier_module.MAX_NETWORK_INPUTS, "cpu", 10)
    monkeypatch.setitem(classifier_module.MAX_GRADIENT_INPUTS, "cpu", 20 if checkpointed else 10_000)
    clf = DiffusionClassifier(any_net, ClassifierSettings(steps=6, noise_seed=2))
    calls = NetworkCalls(any_net)
    stop = {"now": False}
    try:
        x = images.clone().requires_grad_(True)
        outside = torch.autograd.grad(clf(x).logsumexp(1).sum(), x)[0]
        calls.forward = calls.backward = 0
        with cancellation_scope(lambda: stop["now"]):
            free = torch.autograd.grad(clf(x).logsumexp(1).sum(), x)[0]  # never stopped: as outside a scope
            assert torch.equal(free, outside)
            assert calls.forward >= 3 and calls.backward >= 3  # 4 images x 6 levels, in several calls
            calls.forward = calls.backward = 0
            # Stop pressed during the second network call of a forward pass
            hook = any_net.conv_in.register_forward_pre_hook(lambda *_: stop.update(now=calls.forward >= 2))
            try:
                with torch.no_grad(), pytest.raises(OperationCancelled):
                    clf(images)
            finally:
                hook.remove()
            assert calls.forward == 2  # no call after the one during which Stop came
            stop["now"] = False
            calls.forward = calls.backward = 0
            logits = clf(x)
            forward_calls = calls.forward
            assert calls.backward == 0
            stop["now"] = True  # pressed after the forward pass: the backward pass stops at once
            with pytest.raises(OperationCancelled):
                torch.autograd.grad(logits.logsumexp(1).sum(), x)
            assert calls.backward == 0
            assert calls.forward == forward_calls  # a checkpointed segment was not even recomputed
    finally:
        calls.remove()
    assert free.abs().sum() > 0


def test_a_checkpointed_segment_polls_its_scope_when_recomputed_outside_it(any_net, tiny_net, images, monkeypatch):
    """The backward pass recomputes a checkpointed segment where the scope may not be set (on
    CUDA, autograd's own thread; here, after leaving it): the recomputation still polls the
    request of the scope the forward pass ran in, and stops between its calls."""
    import rdc_studio.core.classifier as classifier_module
    from rdc_studio.core.runtime import OperationCancelled, active_cancellation, cancellation_scope

    # 2 calls in every segment: multi-head, 24 (image, level) rows in calls of 6; class
    # embedding, calls of one row (all 10 classes)
    per_call = 6 if any_net is tiny_net else 10
    monkeypatch.setitem(classifier_module.MAX_GRADIENT_CALL_INPUTS, "cpu", per_call)
    monkeypatch.setitem(classifier_module.MAX_GRADIENT_INPUTS, "cpu", 2 * per_call)
    clf = DiffusionClassifier(any_net, ClassifierSettings(steps=6, noise_seed=2))
    calls = NetworkCalls(any_net)
    stop = {"now": False}
    try:
        x = images.clone().requires_grad_(True)
        with cancellation_scope(lambda: stop["now"]):
            logits = clf(x)
        assert active_cancellation() is None
        forward_calls = calls.forward
        # Stop pressed during the first call the backward pass recomputes
        hook = any_net.conv_in.register_forward_pre_hook(lambda *_: stop.update(now=calls.forward > forward_calls))
        try:
            with pytest.raises(OperationCancelled):
                torch.autograd.grad(logits.logsumexp(1).sum(), x)
        finally:
            hook.remove()
        assert calls.forward == forward_calls + 1  # the segment's second call was not recomputed
        assert calls.backward == 0
    finally:
        calls.remove()


def test_fewer_levels_than_the_cards_screening_turn_elimination_off(tiny_net, tmp_path):
    """T below the card's screening levels used to be an error in every job of the default model."""
    from rdc_studio.core.classifier import classifier_settings
    from rdc_studio.core.models import load_checkpoint, save_checkpoint

    path = save_checkpoint(tmp_path / "m.safetensors", tiny_net,
                           {"name": "m", "dataset": "mnist", "classes": [str(i) for i in range(10)],
                            "classifier": {"steps": 16, "screen_levels": 6, "keep_classes": 2}})
    model = load_checkpoint(path)
    assert classifier_settings(model).eliminates
    few = classifier_settings(model, steps=4)
    assert (few.steps, few.screen_levels, few.keep_classes) == (4, 0, 0) and not few.eliminates
    assert classifier_settings(model, steps=8).screen_levels == 6  # enough levels: the card's elimination
    with pytest.raises(ValueError, match="exceeds the number of levels"):  # asked for explicitly: an error
        classifier_settings(model, steps=4, screen_levels=6)


@pytest.mark.parametrize("bad,message", [
    (lambda x: (x * 255).to(torch.uint8), "floating point"),
    (lambda x: x * 255, r"lie in \[0, 1\]"),
    (lambda x: x * 2 - 1, r"lie in \[0, 1\]"),
    (lambda x: x[0], r"batch \(N, C, H, W\)"),
    (lambda x: torch.nn.functional.pad(x, (2, 2, 2, 2)), r"\(1, 32, 32\) per image do not fit the model's \(1, 28, 28\)"),
    (lambda x: x.expand(-1, 3, -1, -1), r"\(3, 28, 28\) per image"),
])
def test_images_outside_the_convention_are_a_clear_error(tiny_net, images, bad, message):
    """A dataset's uint8 field, 0-255 or [-1, 1] scaling, a missing batch axis or another size
    would otherwise give silently wrong logits or a shape error deep inside the network."""
    clf = DiffusionClassifier(tiny_net, ClassifierSettings(steps=2))
    with pytest.raises(ValueError, match=message):
        clf(bad(images))
    with pytest.raises(ValueError, match=message):
        next(clf.stream(bad(images)))


def test_the_cnn_baseline_checks_its_input_too():
    from rdc_studio.core.baseline import SmallCNN

    cnn = SmallCNN().eval()
    with pytest.raises(ValueError, match="floating point"):
        cnn(torch.zeros(2, 1, 28, 28, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\(1, 32, 32\) per image"):
        cnn(torch.zeros(2, 1, 32, 32))
    assert cnn(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
