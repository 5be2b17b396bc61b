import pytest
import torch

from rdc_studio.core.nets import NetConfig, build_denoiser, count_parameters, grow_denoiser


def test_multihead_shapes_and_head_subsets(tiny_net):
    x = torch.randn(3, 1, 28, 28)
    s = torch.tensor([0.1, 1.0, 5.0])
    with torch.no_grad():
        full = tiny_net.denoise(x, s)
        sub = tiny_net.denoise(x, s, heads=[7, 10, 2])
    assert full.shape == (3, 11, 1, 28, 28)
    assert sub.shape == (3, 3, 1, 28, 28)
    # evaluating a subset of heads gives exactly those heads of the full pass
    assert torch.allclose(sub, full[:, [7, 10, 2]], atol=1e-5)
    # the heads differ (they have separate weights)
    assert (full[:, 0] - full[:, 1]).abs().max() > 1e-4


def test_embedding_net_shapes_and_consistency():
    torch.manual_seed(0)
    net = build_denoiser(NetConfig(architecture="embedding", channels=(8, 16), emb_dim=32)).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        x, s = torch.randn(2, 1, 28, 28), torch.tensor([0.5, 2.0])
        full = net.denoise(x, s)
        one = net.denoise(x, s, heads=[4])
        per = net.denoise_labels(x, s, torch.tensor([4, 4]))
    assert full.shape == (2, 11, 1, 28, 28)
    assert torch.allclose(one[:, 0], full[:, 4], atol=1e-5)
    assert torch.allclose(per, full[:, 4], atol=1e-5)


def test_rgb_32px_config():
    net = build_denoiser(NetConfig(image_size=32, in_channels=3, channels=(8, 16, 16), head_channels=(4, 4),
                                   emb_dim=32))
    out = net.denoise(torch.randn(2, 3, 32, 32), torch.ones(2))
    assert out.shape == (2, 11, 3, 32, 32)


def test_denoiser_is_identity_at_tiny_noise(tiny_net):
    x = torch.rand(2, 1, 28, 28) * 2 - 1
    with torch.no_grad():
        d = tiny_net.denoise(x, torch.full((2,), 1e-4))
    assert torch.allclose(d, x.unsqueeze(1).expand_as(d), atol=1e-3)


def test_config_validation():
    with pytest.raises(ValueError):
        NetConfig(architecture="transformer")
    with pytest.raises(ValueError):
        NetConfig(image_size=30, channels=(8, 16, 32))
    with pytest.raises(ValueError):
        NetConfig.from_dict({"channels": [8], "bogus": 1})



def test_head_subsets_by_view_and_by_index_agree(tiny_net):
    """Consecutive heads are sliced (a view), others gathered: both give the full pass's heads."""
    x, s = torch.randn(2, 1, 28, 28), torch.tensor([0.3, 2.0])
    with torch.no_grad():
        full = tiny_net.denoise(x, s)
        classes = tiny_net.denoise(x, s, heads=range(10))
        scattered = tiny_net.denoise(x, s, heads=[9, 3, 10])
    assert torch.allclose(classes, full[:, :10], atol=1e-5)
    assert torch.allclose(scattered, full[:, [9, 3, 10]], atol=1e-5)


@pytest.mark.parametrize("architecture", ["embedding", "multihead"])
def test_grown_denoiser_computes_the_same_function(architecture):
    """Deepening to more blocks per level keeps every output; the added blocks then train."""
    torch.manual_seed(0)
    source = build_denoiser(NetConfig(architecture=architecture, channels=(8, 16), head_channels=(4,),
                                      emb_dim=32)).eval()
    with torch.no_grad():
        for p in source.parameters():  # a trained-looking network, output layer included
            p.add_(torch.randn_like(p) * 0.05)
    grown = grow_denoiser(source, 3, seed=1).eval()
    assert grown.config.blocks_per_level == 3
    assert all(len(blocks) == 3 for blocks in [*grown.down, *grown.up])
    assert count_parameters(grown) > count_parameters(source)
    for name, tensor in source.state_dict().items():
        assert torch.equal(tensor, grown.state_dict()[name]), name
    x, s = torch.randn(4, 1, 28, 28), torch.tensor([0.05, 0.5, 2.0, 10.0])
    with torch.no_grad():
        assert torch.allclose(grown.denoise(x, s), source.denoise(x, s), atol=1e-6)
    # an added block is the identity through its zeroed last convolution, not by lacking weights
    added = grown.down[0][1]
    assert torch.count_nonzero(added.conv2.weight) == 0 and torch.count_nonzero(added.conv1.weight) > 0
    loss = grown.denoise(x, s).square().mean()
    loss.backward()
    assert added.conv2.weight.grad.abs().sum() > 0
    # the same seed initialises the added blocks identically; the source is left alone
    again = grow_denoiser(source, 3, seed=1)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in grown.state_dict().items())
    assert source.config.blocks_per_level == 1 and len(source.down[0]) == 1


def test_grow_refuses_to_shrink():
    source = build_denoiser(NetConfig(architecture="embedding", channels=(8, 16), blocks_per_level=2, emb_dim=32))
    with pytest.raises(ValueError, match="cannot grow 2 blocks per level to 1"):
        grow_denoiser(source, 1)


def test_an_odd_embedding_width_is_refused():
    """Its cos/sin features would be one short of the layer after them (a shape error in training)."""
    import pytest

    from rdc_studio.core.nets import NetConfig

    with pytest.raises(ValueError, match="emb_dim must be even, not 17"):
        NetConfig(emb_dim=17)
