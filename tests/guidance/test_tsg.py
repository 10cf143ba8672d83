"""TSG (Sadat et al. 2025, arXiv 2407.02687, time-step guidance: a perturbed time embedding as the unconditional
branch): its perturbed forward against a forward whose time embedding output is replaced by hand (tiny UNet, tiny
DiT), the network as it was afterwards; its evaluations; refusals in one line."""

import copy

import pytest
import torch

from diffguide.errors import UserError
from diffguide.guidance.icg import ICG
from diffguide.guidance.tsg import TSG
from diffguide.models import dit as dit_lib, gmm, hooks, unet as unet_lib
from diffguide.samplers.ddim import DDIM
from tests.helpers import SCHEDULE, ToyDenoiser, constant_noise, generators


def tiny_unet() -> unet_lib.UNetDenoiser:
    torch.manual_seed(0)
    config = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=[8, 16], layers_per_block=1,
                  down_block_types=["DownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "UpBlock2D"],
                  norm_num_groups=4)
    return unet_lib.build(config, 10, SCHEDULE).eval()


def tiny_pixel_dit() -> dit_lib.PixelDiT:
    torch.manual_seed(0)
    model = dit_lib.build(dict(sample_size=8, in_channels=1, out_channels=1, patch_size=2, num_layers=2,
                               num_attention_heads=2, attention_head_dim=8, norm_type="ada_norm_zero"), 10, SCHEDULE)
    for p in model.parameters():  # DiT's initialisation zeroes the adaLN and output layers: give them weights
        if p.abs().sum() == 0:
            p.data.normal_(0, 0.3)
    return model.eval()


def hooks_left(model) -> bool:
    return any("_diffusers_hook" in vars(m) or "forward" in vars(m) for m in model.modules())


def add_to_output(module, delta):
    """Make `module` (of a copy) return its own output plus delta: the perturbation written by hand."""
    original = module.forward
    module.forward = lambda *args, **kwargs: original(*args, **kwargs) + delta


def test_unet_declares_its_time_embedding_and_dit_its_timestep_embedders():
    model = tiny_unet()
    assert model.parts().time_embeddings == [model.unet.time_embedding]
    dit = tiny_pixel_dit()
    embedders = dit.parts().time_embeddings
    assert embedders == [block.norm1.emb.timestep_embedder for block in dit.transformer.transformer_blocks]
    assert not any(block.norm1.emb.class_embedder is m for block in dit.transformer.transformer_blocks
                   for m in embedders)
    assert ToyDenoiser().parts().time_embeddings == [] and gmm.image().parts().time_embeddings == []


@pytest.mark.parametrize("alpha, t, factor", [(0.0, 500, 0.7), (1.0, 500, 0.7 * 0.5), (2.0, 250, 0.7 * 0.0625)])
def test_tsg_perturbed_forward_on_a_unet_equals_the_time_embedding_replaced_by_hand(alpha, t, factor):
    """At w = 0, TSG's prediction is the perturbed forward alone: the UNet whose time_embedding output gets
    s t^alpha n added (t = timestep / 1000, n = the first 32 entries of the sample's noise draw), class embedding
    untouched. The network is as it was afterwards."""
    model = tiny_unet()
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([3, 7])
    z = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model.predict(x, t, labels).eps
        guidance = TSG(0.0, noise_scale=0.7, alpha=alpha)
        guidance.check(model)
        guidance.begin(model, labels, [t], constant_noise(z))
        pred = guidance(model, x, t, labels)
        by_hand = copy.deepcopy(model)
        add_to_output(by_hand.unet.time_embedding, factor * z.flatten(1)[:, :32])
        expected = by_hand.predict(x, t, labels).eps
        assert torch.allclose(pred.eps, expected, atol=1e-5)
        assert not torch.allclose(pred.eps, before, atol=1e-3)
        assert pred.nfe == 2
        assert not hooks_left(model) and torch.equal(model.predict(x, t, labels).eps, before)


def test_tsg_combines_the_two_forwards_as_cfg_does():
    """w = 2.5: D = D_pert + 2.5 (D - D_pert), the unperturbed half exactly the plain forward."""
    model = tiny_unet()
    x, labels, t = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(3)), torch.tensor([0, 4, 9]), 300
    z = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        plain = model.predict(x, t, labels).eps
        perturbed = TSG(0.0)
        perturbed.begin(model, labels, [t], constant_noise(z))
        d_pert = perturbed(model, x, t, labels).eps
        guidance = TSG(2.5)
        guidance.begin(model, labels, [t], constant_noise(z))
        pred = guidance(model, x, t, labels)
    assert torch.allclose(pred.eps, d_pert + 2.5 * (plain - d_pert), atol=1e-5)
    assert torch.allclose(TSG(1.0)(model, x, t, labels).eps, plain, atol=1e-6)  # w = 1: no draw, one evaluation


def test_tsg_on_a_dit_perturbs_every_blocks_timestep_embedder_alike():
    """diffusers' DiT: each block's norm1.emb.timestep_embedder output gets the same s n (block 0's also for the
    final layer, which calls it again); the label embedders are untouched."""
    model = tiny_pixel_dit()
    x, labels, t = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(5)), torch.tensor([1, 8]), 600
    z = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(6))
    width = model.transformer.transformer_blocks[0].norm1.emb.timestep_embedder.linear_2.out_features
    draws = z.flatten(1)
    while draws.shape[1] < width:
        draws = torch.cat([draws, z.flatten(1)], 1)
    with torch.no_grad():
        before = model.predict(x, t, labels).eps
        guidance = TSG(0.0, noise_scale=0.5)
        guidance.check(model)
        guidance.begin(model, labels, [t], constant_noise(z))
        pred = guidance(model, x, t, labels)
        by_hand = copy.deepcopy(model)
        for block in by_hand.transformer.transformer_blocks:
            add_to_output(block.norm1.emb.timestep_embedder, 0.5 * draws[:, :width])
        assert torch.allclose(pred.eps, by_hand.predict(x, t, labels).eps, atol=1e-5)
        assert not torch.allclose(pred.eps, before, atol=1e-3)
        assert not hooks_left(model) and torch.equal(model.predict(x, t, labels).eps, before)


def test_tsg_spends_two_evaluations_per_step_and_guides_an_unconditional_network():
    """DDIM over 5 steps: 10 evaluations; a UNet without class embeddings (ddpm_cifar10's kind) is guided, ICG
    refuses it."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=[8, 16], layers_per_block=1,
                       down_block_types=["DownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "UpBlock2D"],
                       norm_num_groups=4)
    model = unet_lib.PretrainedUNet(unet, SCHEDULE, num_classes=10).eval()
    assert model.parts().time_embeddings == [unet.time_embedding]
    with pytest.raises(UserError, match="takes no class labels"):
        ICG(2.0).check(model)
    guidance = TSG(2.0)
    guidance.check(model)
    labels = torch.tensor([0, 1])
    x0, nfe = DDIM(5).sample(model, guidance, torch.randn(2, 1, 8, 8), labels, generators([0, 1]))
    assert nfe == 10 and torch.isfinite(x0).all() and not hooks_left(model)
    x0_cond, nfe_cond = DDIM(5).sample(model, TSG(1.0), torch.randn(2, 1, 8, 8), labels, generators([0, 1]))
    assert nfe_cond == 5


def test_tsg_refusals_are_one_line():
    for model, match in ((gmm.image(), "no closed-form meaning"), (ToyDenoiser(), "declares none")):
        with pytest.raises(UserError, match=match) as caught:
            TSG(2.0).check(model)
        assert "\n" not in str(caught.value)
    for bad in ({"noise_scale": -1.0}, {"alpha": float("nan")}, {"noise_scale": True}):
        with pytest.raises(UserError, match="must be a finite number >= 0"):
            TSG(2.0, **bad)
    with pytest.raises(UserError, match="schedule kind 'bogus'"):
        TSG(2.0, schedule="bogus")


def test_outputs_perturbed_leaves_no_trace_and_refuses_no_modules():
    model = tiny_unet()
    x, labels = torch.randn(1, 1, 8, 8), torch.tensor([2])
    with torch.no_grad():
        before = model.predict(x, 100, labels).eps
        try:
            with hooks.outputs_perturbed([model.unet.time_embedding] * 2, lambda out: out * 2.0):
                assert not torch.allclose(model.predict(x, 100, labels).eps, before, atol=1e-3)
                raise KeyError
        except KeyError:
            pass
        assert not hooks_left(model) and torch.equal(model.predict(x, 100, labels).eps, before)
    with pytest.raises(UserError, match="declares none") as caught:
        hooks.outputs_perturbed([], lambda out: out, name="ToyDenoiser", what="guidance=tsg")
    assert "\n" not in str(caught.value)
