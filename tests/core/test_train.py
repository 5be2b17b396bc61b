import json
import re
import shutil

import pytest
import torch

from rdc_studio.core.data import TensorDataset
from rdc_studio.core.models import load_checkpoint
from rdc_studio.core.nets import NetConfig
from rdc_studio.core.train import TrainConfig, check_resume, ema_decay_at, export_from_state, lr_at, train

from rdc_studio.core.data import mnist_available


def _dataset(n=96):
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(n, 1, 28, 28, generator=g) * 255).to(torch.uint8)
    labels = torch.randint(0, 10, (n,), generator=g)
    return TensorDataset(images, labels, [str(i) for i in range(10)], "mnist", "train")


def _cfgs():
    return (NetConfig(channels=(8, 16), head_channels=(4,), emb_dim=32),
            TrainConfig(epochs=1, batch_size=12, warmup_steps=2, seed=1))


def test_ema_warmup():
    assert ema_decay_at(0, 0.999) == pytest.approx(0.1)
    assert ema_decay_at(10_000_000, 0.999) == 0.999


def test_learning_rate_schedules():
    constant = TrainConfig(lr=1e-3, warmup_steps=10)
    assert lr_at(0, 100, constant) == pytest.approx(1e-4)
    assert lr_at(9, 100, constant) == lr_at(99, 100, constant) == pytest.approx(1e-3)
    cosine = TrainConfig(lr=1e-3, warmup_steps=10, lr_schedule="cosine")
    assert lr_at(4, 110, cosine) == pytest.approx(5e-4)  # the warm-up is the same
    assert lr_at(10, 110, cosine) == pytest.approx(1e-3)
    assert lr_at(60, 110, cosine) == pytest.approx(5e-4)  # half-way down the cosine
    assert lr_at(110, 110, cosine) == pytest.approx(0.0, abs=1e-12)
    rates = [lr_at(s, 110, cosine) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(lr_schedule="linear")
    with pytest.raises(ValueError, match="p_std"):
        TrainConfig(p_std=0.0)


def test_training_noise_distribution_is_configurable(tmp_path):
    """p_mean/p_std reach the loss (a different draw of noise levels, a different loss) and the card."""
    net_cfg, cfg = _cfgs()
    base = list(train(_dataset(), net_cfg, cfg, tmp_path / "edm", log_every=1))
    shifted_cfg = TrainConfig(epochs=1, batch_size=12, warmup_steps=2, seed=1, p_mean=1.0, p_std=0.5,
                              lr_schedule="cosine")
    shifted = list(train(_dataset(), net_cfg, shifted_cfg, tmp_path / "shift", log_every=1))
    assert base[0].loss != pytest.approx(shifted[0].loss)
    assert shifted[-1].lr < shifted[0].lr
    card = load_checkpoint(tmp_path / "shift" / "model.safetensors").card["training"]
    assert card["p_mean"] == 1.0 and card["p_std"] == 0.5 and card["lr_schedule"] == "cosine"


def test_resume_reproduces_uninterrupted_run(tmp_path):
    net_cfg, cfg = _cfgs()
    full = list(train(_dataset(), net_cfg, cfg, tmp_path / "a", log_every=1))
    assert [r.step for r in full] == list(range(1, 9))
    calls = {"n": 0}

    def stop_after_3():
        calls["n"] += 1
        return calls["n"] > 3

    part = list(train(_dataset(), net_cfg, cfg, tmp_path / "b", log_every=1, should_stop=stop_after_3))
    assert part[-1].step == 3 and not (tmp_path / "b" / "model.safetensors").exists()
    assert json.loads((tmp_path / "b" / "state.json").read_text())["step"] == 3
    rest = list(train(_dataset(), net_cfg, cfg, tmp_path / "b", log_every=1))
    assert rest[0].step == 4 and rest[-1].step == 8
    a = load_checkpoint(tmp_path / "a" / "model.safetensors").net.state_dict()
    b = load_checkpoint(tmp_path / "b" / "model.safetensors").net.state_dict()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


def test_final_card_and_export(tmp_path):
    net_cfg, cfg = _cfgs()
    list(train(_dataset(), net_cfg, cfg, tmp_path / "r", card_extra={"training_command": "rdc train ..."}))
    model = load_checkpoint(tmp_path / "r" / "model.safetensors")
    t = model.card["training"]
    assert t["steps"] == 8 and t["seed"] == 1 and t["wall_seconds"] > 0 and "hardware" in t
    assert model.card["training_command"] == "rdc train ..."
    out = export_from_state(tmp_path / "r", tmp_path / "snap.safetensors")
    snap = load_checkpoint(out).net.state_dict()
    for k, v in model.net.state_dict().items():
        assert torch.equal(v, snap[k])


def test_resume_refuses_different_config(tmp_path):
    net_cfg, cfg = _cfgs()
    list(train(_dataset(), net_cfg, cfg, tmp_path / "r"))
    with pytest.raises(ValueError, match="different network config"):
        list(train(_dataset(), NetConfig(channels=(8, 8), head_channels=(4,), emb_dim=32), cfg, tmp_path / "r"))


def test_init_from_starts_at_the_given_weights(tmp_path):
    """Fine-tuning: zero steps reproduce the source exactly; the card names the source."""
    net_cfg, cfg = _cfgs()
    list(train(_dataset(), net_cfg, cfg, tmp_path / "src"))
    source = load_checkpoint(tmp_path / "src" / "model.safetensors")
    list(train(_dataset(), net_cfg, TrainConfig(epochs=0, batch_size=12, seed=5), tmp_path / "ft",
               init_from=source.net, init_name="src"))
    tuned = load_checkpoint(tmp_path / "ft" / "model.safetensors")
    assert tuned.card["training"]["init_from"] == "src"
    for k, v in source.net.state_dict().items():
        assert torch.equal(v, tuned.net.state_dict()[k])
    # a step of training moves the weights away from the source
    list(train(_dataset(), net_cfg, TrainConfig(epochs=1, batch_size=12, warmup_steps=1, seed=5),
               tmp_path / "ft2", init_from=source.net, init_name="src"))
    moved = load_checkpoint(tmp_path / "ft2" / "model.safetensors").net.state_dict()
    assert any(not torch.equal(v, moved[k]) for k, v in source.net.state_dict().items())


def test_init_from_refuses_a_different_architecture(tmp_path):
    net_cfg, cfg = _cfgs()
    list(train(_dataset(), net_cfg, cfg, tmp_path / "src"))
    source = load_checkpoint(tmp_path / "src" / "model.safetensors")
    other = NetConfig(channels=(8, 8), head_channels=(4,), emb_dim=32)
    with pytest.raises(ValueError, match="differs from the requested"):
        list(train(_dataset(), other, cfg, tmp_path / "ft", init_from=source.net, init_name="src"))


def test_cli_init_from_refuses_another_dataset(tmp_path):
    from rdc_studio.core.cli import main

    net_cfg, cfg = _cfgs()
    list(train(_dataset(), net_cfg, cfg, tmp_path / "src"))
    card = json.loads((tmp_path / "src" / "model.json").read_text())
    card["dataset"] = "cifar10"
    (tmp_path / "src" / "model.json").write_text(json.dumps(card))
    with pytest.raises(SystemExit, match="cifar10 model, not mnist"):
        main(["train", "--dataset", "mnist", "--out", str(tmp_path / "ft"),
              "--init-from", str(tmp_path / "src" / "model.safetensors"), "--epochs", "0"])


def test_cli_grow_blocks_needs_init_from(tmp_path):
    from rdc_studio.core.cli import main

    with pytest.raises(SystemExit, match="--grow-blocks deepens a trained checkpoint"):
        main(["train", "--out", str(tmp_path / "g"), "--grow-blocks", "2", "--epochs", "0"])
    assert not (tmp_path / "g").exists()


@pytest.mark.skipif(not mnist_available(), reason="needs ../shared/data MNIST")
def test_cli_grow_blocks_fine_tunes_a_deeper_copy(tmp_path):
    """--init-from X --grow-blocks 2: the run trains the deepened network, which starts as X."""
    from rdc_studio.core.cli import main

    net_cfg, cfg = _cfgs()
    list(train(_dataset(), net_cfg, cfg, tmp_path / "src"))
    source = load_checkpoint(tmp_path / "src" / "model.safetensors")
    rc = main(["train", "--dataset", "mnist", "--out", str(tmp_path / "grown"), "--limit", "24",
               "--init-from", str(tmp_path / "src" / "model.safetensors"), "--grow-blocks", "2",
               "--epochs", "0", "--seed", "3"])
    assert rc == 0
    grown = load_checkpoint(tmp_path / "grown" / "model.safetensors")
    assert grown.net.config.blocks_per_level == 2
    assert grown.card["training"]["init_from"] == "src, grown to 2 blocks per level"
    assert "--grow-blocks 2" in grown.card["training_command"]
    x, s = torch.randn(3, 1, 28, 28), torch.tensor([0.2, 1.0, 4.0])
    with torch.no_grad():
        assert torch.allclose(grown.net.denoise(x, s), source.net.denoise(x, s), atol=1e-6)


@pytest.mark.skipif(not mnist_available(), reason="needs ../shared/data MNIST")
def test_real_training_run_lowers_loss(tmp_path):
    """A short real run on MNIST through the CLI: the loss falls and the model classifies."""
    from rdc_studio.core.cli import main

    log = tmp_path / "log.jsonl"
    rc = main(["train", "--dataset", "mnist", "--out", str(tmp_path / "run"), "--channels", "8,16",
               "--head-channels", "4", "--emb-dim", "32", "--epochs", "1", "--limit", "1536",
               "--batch-size", "32", "--warmup-steps", "5", "--lr", "2e-3", "--log-every", "8", "--log", str(log)])
    assert rc == 0
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert records[-1]["step"] == 48
    assert records[-1]["loss"] < 0.7 * records[0]["loss"]
    model = load_checkpoint(tmp_path / "run" / "model.safetensors")
    assert model.card["training_command"].startswith("rdc train --dataset mnist")


def test_cross_entropy_uses_the_classifier_logit_estimate():
    """For the edm weighting the importance ratio w/p_train is exactly lambda(sigma)."""
    from rdc_studio.core.diffusion import loss_weight
    from rdc_studio.core.train import classifier_cross_entropy

    errors = torch.tensor([[3.0, 1.0, 2.0], [0.5, 0.25, 4.0], [1.0, 2.0, 3.0]])
    sigma = torch.tensor([0.5, 2.0, 50.0])  # the last draw lies outside [0.1, 10]
    labels = torch.tensor([1, 0, 2])
    ce, correct, counted = classifier_cross_entropy(errors, sigma, labels, "edm", 0.1, 10.0)
    logits = -loss_weight(sigma[:2]).unsqueeze(1) * errors[:2]
    expected = torch.nn.functional.cross_entropy(logits, labels[:2])
    assert counted == 2 and correct == 1  # example 0 is right (smallest error), example 1 is wrong
    assert ce.item() == pytest.approx(expected.item(), rel=1e-5)
    none, _, n = classifier_cross_entropy(errors[2:], sigma[2:], labels[2:], "edm", 0.1, 10.0)
    assert none is None and n == 0


def test_hybrid_objective_trains_and_reports_accuracy(tmp_path):
    net_cfg, cfg = _cfgs()
    cfg.ce_weight = 0.01
    recs = list(train(_dataset(), net_cfg, cfg, tmp_path / "h", log_every=4))
    assert all(r.ce_loss > 0 and 0.0 <= r.train_accuracy <= 1.0 for r in recs)
    assert all(torch.isfinite(torch.tensor(r.loss)) for r in recs)
    card = load_checkpoint(tmp_path / "h" / "model.safetensors").card
    assert card["training"]["ce_weight"] == 0.01


def test_hybrid_objective_refuses_the_embedding_network(tmp_path):
    _, cfg = _cfgs()
    cfg.ce_weight = 0.01
    net_cfg = NetConfig(architecture="embedding", channels=(8, 16), emb_dim=32)
    with pytest.raises(ValueError, match="multi-head"):
        list(train(_dataset(), net_cfg, cfg, tmp_path / "e"))


_CLI_TRAIN = ["train", "--dataset", "mnist", "--channels", "8,16", "--head-channels", "4", "--emb-dim", "32",
              "--batch-size", "12", "--epochs", "1", "--warmup-steps", "2"]
"""A tiny ``rdc train`` (on :func:`_dataset`, patched in for MNIST)."""


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """A real run folder made by ``rdc train`` (8 steps, so the state holds Adam's moments)."""
    from rdc_studio.core.cli import main

    run = tmp_path_factory.mktemp("cli") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("rdc_studio.core.data.load_dataset", lambda *args, **kwargs: _dataset())
        assert main(_CLI_TRAIN + ["--out", str(run)]) == 0
    return run


_DROP = object()
"""A key :func:`_set_json` removes."""


def _set_json(**changes):
    def corrupt(run):
        state = json.loads((run / "state.json").read_text())
        state.update(changes)
        state = {k: v for k, v in state.items() if v is not _DROP}
        (run / "state.json").write_text(json.dumps(state))
    return corrupt


def _set_group(**changes):
    def corrupt(run):
        state = json.loads((run / "state.json").read_text())
        state["param_groups"][0].update(changes)
        (run / "state.json").write_text(json.dumps(state))
    return corrupt


def _set_tensors(change):
    def corrupt(run):
        from safetensors import safe_open
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(run / "state.safetensors"))
        with safe_open(str(run / "state.safetensors"), framework="pt") as f:
            metadata = f.metadata()  # the run state saved with the tensors: still of the same save
        save_file(change(tensors), str(run / "state.safetensors"), metadata=metadata)
    return corrupt


_CORRUPT = {
    "json_garbage": ("state.json", lambda r: (r / "state.json").write_text("{oops"), "the run state is not valid JSON"),
    "json_list": ("state.json", lambda r: (r / "state.json").write_text("[1]"), "a JSON list, not an object"),
    "no_param_groups": ("state.json", _set_json(param_groups=_DROP), "lacks 'param_groups'"),
    "step_str": ("state.json", _set_json(step="x"), "'step' must be a whole number, not 'x'"),
    "step_negative": ("state.json", _set_json(step=-5), "must be at least 0, not -5"),
    "wall_nan": ("state.json", _set_json(wall_seconds=float("nan")), "must be at least 0"),
    "train_list": ("state.json", _set_json(train=[1]), "'train' must be an object"),
    "groups_not_objects": ("state.json", _set_json(param_groups=[1]), "'param_groups' must be 1 object"),
    "lr_str": ("state.json", _set_group(lr="x"), r"param_groups\[0\] does not fit .* in lr"),
    "amsgrad": ("state.json", _set_group(amsgrad=True), "in amsgrad"),
    "params_missing": ("state.json", _set_group(params=[0]), "in params"),
    "tensors_missing": ("state.safetensors", lambda r: (r / "state.safetensors").unlink(), "missing; the run's"),
    "tensors_truncated": ("state.safetensors",
                          lambda r: (r / "state.safetensors").write_bytes((r / "state.safetensors").read_bytes()[:500]),
                          "not a readable safetensors file"),
    "rng_truncated": ("state.safetensors", _set_tensors(lambda t: {**t, "rng": t["rng"][:10]}),
                      "of another shape or dtype rng"),
    "model_missing": ("state.safetensors",
                      _set_tensors(lambda t: {k: v for k, v in t.items() if not k.startswith("model.conv_in")}),
                      "missing model.conv_in.bias, model.conv_in.weight"),
    "ema_shape": ("state.safetensors", _set_tensors(lambda t: {**t, "ema.conv_in.bias": t["ema.conv_in.bias"][:1]}),
                  "of another shape or dtype ema.conv_in.bias"),
    "adam_partial": ("state.safetensors", _set_tensors(lambda t: {k: v for k, v in t.items() if k != "opt.0.exp_avg"}),
                     "missing opt.0.exp_avg"),
    "adam_unknown": ("state.safetensors", _set_tensors(lambda t: {**t, "opt.999.step": t["opt.0.step"].clone()}),
                     "unexpected opt.999.step"),
}


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("case", sorted(_CORRUPT))
def test_corrupt_run_state_is_refused_in_one_line_and_left_as_it_is(cli_run, tmp_path, monkeypatch, case):
    """check_resume, train() and ``rdc train`` refuse a damaged run folder before writing anything:
    a ValueError (one ``rdc: error:`` line) that names the damaged file."""
    from rdc_studio.core.cli import main

    name, corrupt, problem = _CORRUPT[case]
    run = tmp_path / "run"
    shutil.copytree(cli_run, run)
    state = json.loads((run / "state.json").read_text())
    net_cfg, cfg, ds = NetConfig.from_dict(state["net"]), TrainConfig(**state["train"]), _dataset()
    assert check_resume(run, net_cfg, cfg, ds) == []  # the intact copy resumes
    corrupt(run)
    before = _snapshot(run)
    expected = re.escape(f"{run / name}: ") + f".*{problem}"
    for attempt in (lambda: check_resume(run, net_cfg, cfg, ds), lambda: list(train(ds, net_cfg, cfg, run))):
        with pytest.raises(ValueError, match=expected) as exc:
            attempt()
        assert "\n" not in str(exc.value)
    monkeypatch.setattr("rdc_studio.core.data.load_dataset", lambda *args, **kwargs: _dataset())
    with pytest.raises(SystemExit) as exc:
        main(_CLI_TRAIN + ["--out", str(run)])
    assert re.fullmatch("rdc: error: " + expected + "[^\n]*", str(exc.value.code))
    assert _snapshot(run) == before


def test_a_run_saved_with_other_optimizer_implementation_flags_resumes(cli_run, tmp_path):
    """foreach / fused / capturable differ between torch versions and devices: not the update."""
    run = tmp_path / "run"
    shutil.copytree(cli_run, run)
    state = json.loads((run / "state.json").read_text())
    for group in state["param_groups"]:
        group.update(foreach=True, capturable=True)
    (run / "state.json").write_text(json.dumps(state))
    net_cfg, cfg = NetConfig.from_dict(state["net"]), TrainConfig(**state["train"])
    assert check_resume(run, net_cfg, cfg, _dataset()) == []


def _quiet_cfg(**changes):
    """:func:`_cfgs`' training settings, checkpointing only when stopped or done (not on the clock)."""
    return TrainConfig(**{**vars(_cfgs()[1]), "checkpoint_minutes": 1e6, **changes})


def _stop_after(n):
    """A ``should_stop`` that lets ``n`` steps run."""
    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        return calls["n"] > n
    return stop


def _assert_same_model(a, b):
    wa = load_checkpoint(a / "model.safetensors").net.state_dict()
    wb = load_checkpoint(b / "model.safetensors").net.state_dict()
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_dropout_training_is_reproducible_and_resumes_exactly(tmp_path):
    """The dropout masks come from the run's own generator (from its seed, saved with the
    run), so the same seed gives the same weights whatever else drew from the global
    generator, and an interrupted run resumes bit for bit."""
    net_cfg = NetConfig(channels=(8, 16), head_channels=(4,), emb_dim=32, dropout=0.3)
    cfg = _quiet_cfg()
    torch.manual_seed(123)
    outer = torch.get_rng_state()
    list(train(_dataset(), net_cfg, cfg, tmp_path / "a"))
    assert torch.equal(torch.get_rng_state(), outer)  # the caller's generator is left as it was
    torch.rand(7)  # another state of the global generator: no effect on a run
    list(train(_dataset(), net_cfg, cfg, tmp_path / "b"))
    _assert_same_model(tmp_path / "a", tmp_path / "b")
    part = list(train(_dataset(), net_cfg, cfg, tmp_path / "c", log_every=1, should_stop=_stop_after(3)))
    assert part[-1].step == 3
    torch.rand(5)
    list(train(_dataset(), net_cfg, cfg, tmp_path / "c"))
    _assert_same_model(tmp_path / "a", tmp_path / "c")
    list(train(_dataset(), _cfgs()[0], cfg, tmp_path / "no-dropout"))  # the masks do change the result
    with pytest.raises(AssertionError):
        _assert_same_model(tmp_path / "a", tmp_path / "no-dropout")


def test_draws_from_the_global_generator_during_a_step_leave_the_dropout_masks_alone(tmp_path, monkeypatch):
    """Another user of torch's global generator (another thread, or code inside the step)
    cannot change a run: the masks are drawn from the run's generator, not the global one."""
    import rdc_studio.core.train as train_module

    net_cfg = NetConfig(channels=(8, 16), head_channels=(4,), emb_dim=32, dropout=0.3)
    cfg = _quiet_cfg()
    list(train(_dataset(), net_cfg, cfg, tmp_path / "quiet"))
    loss = train_module.diffusion_loss

    def with_other_draws(*args, **kwargs):
        torch.rand(11)  # as if another thread drew at this moment
        return loss(*args, **kwargs)

    monkeypatch.setattr(train_module, "diffusion_loss", with_other_draws)
    list(train(_dataset(), net_cfg, cfg, tmp_path / "busy"))
    _assert_same_model(tmp_path / "quiet", tmp_path / "busy")


def test_the_runs_dropout_draws_the_masks_nn_dropout_draws_from_a_generator_in_the_same_state():
    """On the CPU the generator-fed dropout gives nn.Dropout's result bit for bit (so runs
    saved when the state was swapped into the global generator resume as they would have)."""
    from rdc_studio.core.nets import StreamDropout

    x = torch.randn(4, 8, 6, 6, requires_grad=True)
    ours = StreamDropout(0.3).train()
    ours.generator = torch.Generator().manual_seed(42)
    theirs = torch.nn.Dropout(0.3).train()
    outer = torch.get_rng_state()
    torch.manual_seed(42)
    expected = theirs(x)
    torch.set_rng_state(outer)
    got = ours(x)
    assert torch.equal(got, expected) and torch.equal(torch.get_rng_state(), outer)
    got.sum().backward()
    assert torch.equal(x.grad, (got != 0).float() / 0.7)
    assert torch.equal(ours.eval()(x), x)


def test_a_save_interrupted_between_its_two_files_resumes_from_the_newer_tensors(tmp_path, monkeypatch):
    """A second Ctrl-C between ``state.safetensors`` and ``state.json`` leaves newer tensors
    beside an older state.json: the state saved with the tensors is used (and state.json is
    rewritten), so the run still ends bit for bit where an uninterrupted one does."""
    import rdc_studio.core.train as train_module

    net_cfg, cfg = _cfgs()[0], _quiet_cfg()
    list(train(_dataset(), net_cfg, cfg, tmp_path / "full"))
    run = tmp_path / "torn"
    list(train(_dataset(), net_cfg, cfg, run, should_stop=_stop_after(3)))
    write_json = train_module.atomic_write_json

    def interrupted(path, obj):
        if str(path).endswith("state.json"):
            raise KeyboardInterrupt  # after state.safetensors has been replaced
        write_json(path, obj)

    monkeypatch.setattr(train_module, "atomic_write_json", interrupted)
    with pytest.raises(KeyboardInterrupt):
        list(train(_dataset(), net_cfg, cfg, run, should_stop=_stop_after(2)))
    monkeypatch.undo()
    assert json.loads((run / "state.json").read_text())["step"] == 3  # the tensors are of step 5
    assert check_resume(run, net_cfg, cfg, _dataset()) == []
    rest = list(train(_dataset(), net_cfg, cfg, run, log_every=1))
    assert rest[0].step == 6 and rest[-1].step == 8
    _assert_same_model(tmp_path / "full", run)
    assert json.loads((run / "state.json").read_text())["step"] == 8


def test_a_state_safetensors_of_another_run_or_an_earlier_save_is_refused(tmp_path):
    """state.json and state.safetensors must be of one save: tensors copied from another run,
    or put back from an earlier save, are refused in one line before anything is written."""
    from rdc_studio.core.cli import main

    net_cfg, cfg = _cfgs()[0], _quiet_cfg()
    run, other = tmp_path / "run", tmp_path / "other"
    list(train(_dataset(), net_cfg, cfg, run, should_stop=_stop_after(3)))
    list(train(_dataset(), net_cfg, _quiet_cfg(seed=2), other, should_stop=_stop_after(5)))
    earlier = (run / "state.safetensors").read_bytes()
    list(train(_dataset(), net_cfg, cfg, run, should_stop=_stop_after(2)))
    run_id = json.loads((run / "state.json").read_text())["run_id"][:8]
    other_id = json.loads((other / "state.json").read_text())["run_id"][:8]
    for tensors, holds in (((other / "state.safetensors").read_bytes(), f"run {other_id} at step 5"),
                           (earlier, f"run {run_id} at step 3")):
        (run / "state.safetensors").write_bytes(tensors)
        before = _snapshot(run)
        expected = (re.escape(f"{run / 'state.safetensors'}: not saved together with state.json: it holds {holds}, "
                              f"state.json run {run_id} at step 5") + " .*use a new --out")
        for attempt in (lambda: check_resume(run, net_cfg, cfg, _dataset()),
                        lambda: list(train(_dataset(), net_cfg, cfg, run)),
                        lambda: export_from_state(run, tmp_path / "export.safetensors")):
            with pytest.raises(ValueError, match=expected) as exc:
                attempt()
            assert "\n" not in str(exc.value)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr("rdc_studio.core.data.load_dataset", lambda *args, **kwargs: _dataset())
            with pytest.raises(SystemExit, match="rdc: error: " + expected):
                main(_CLI_TRAIN + ["--out", str(run)])
        assert _snapshot(run) == before


def test_a_run_saved_in_the_earlier_format_still_resumes_exactly(tmp_path):
    """Run folders written before the two files were tied together (no run_id or save_id in
    state.json; neither a run state nor the dropout generator in state.safetensors) resume
    as they did, bit for bit without dropout, and are saved in the new format from then on."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    net_cfg, cfg = _cfgs()[0], _quiet_cfg()
    list(train(_dataset(), net_cfg, cfg, tmp_path / "full"))
    run = tmp_path / "old"
    list(train(_dataset(), net_cfg, cfg, run, should_stop=_stop_after(3)))
    state = json.loads((run / "state.json").read_text())
    (run / "state.json").write_text(json.dumps({k: v for k, v in state.items() if k not in ("run_id", "save_id")}))
    tensors = load_file(str(run / "state.safetensors"))
    save_file({k: v for k, v in tensors.items() if k != "rng_dropout"}, str(run / "state.safetensors"))
    assert check_resume(run, net_cfg, cfg, _dataset()) == []
    list(train(_dataset(), net_cfg, cfg, run, should_stop=_stop_after(2)))
    new = json.loads((run / "state.json").read_text())
    with safe_open(str(run / "state.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["rdc_run_state"])["save_id"] == new["save_id"]
    list(train(_dataset(), net_cfg, cfg, run))
    _assert_same_model(tmp_path / "full", run)
