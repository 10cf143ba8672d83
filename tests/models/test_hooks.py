"""Network hooks (diffguide/models/hooks.py): perturbed forwards of a model's own network, on a tiny random DiT
(DiTTransformer2DModel and its LatentDiT wrapper) and a tiny UNet2DModel with attention, checked against forwards
written by hand or against diffusers' own PAG processor, and the network left as it was after the `with`."""

import copy
import math

import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiTTransformer2DModel
from diffusers.models.attention_processor import PAGIdentitySelfAttnProcessor2_0
from torch import nn
from torchvision.transforms.v2.functional import gaussian_blur

from diffguide.errors import UserError
from diffguide.models import hooks, unet as unet_lib
from diffguide.models.dit import LatentDiT
from diffguide.models.hooks import Perturbation
from tests.helpers import SCHEDULE, ToyDenoiser

KINDS = [Perturbation("attention_identity", (0,)), Perturbation("attention_blur", (1,)),
         Perturbation("attention_blur", (0, 1), blur_sigma=0.5), Perturbation("skip_block", (1,))]


def tiny_dit() -> DiTTransformer2DModel:
    torch.manual_seed(0)
    net = DiTTransformer2DModel(num_layers=2, attention_head_dim=8, num_attention_heads=2, in_channels=4,
                                out_channels=8, sample_size=8, patch_size=2, num_embeds_ada_norm=10,
                                norm_type="ada_norm_zero", norm_elementwise_affine=False, norm_num_groups=32)
    for p in net.parameters():  # adaLN-zero zeroes the block gates and the final projection: give them weights
        if p.abs().sum() == 0:
            p.data.normal_(0, 0.3)
    return net.eval()


def tiny_unet_model() -> unet_lib.UNetDenoiser:
    torch.manual_seed(0)
    config = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=[8, 16], layers_per_block=1,
                  down_block_types=["AttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "AttnUpBlock2D"],
                  norm_num_groups=4, attention_head_dim=4)
    return unet_lib.build(config, 10, SCHEDULE).eval()


INPUTS = dict(hidden_states=torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)),
              timestep=torch.tensor([10, 500]), class_labels=torch.tensor([1, 3]))
UNET_X = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(2))


def dit_out(net):
    return net(**INPUTS).sample


def unet_out(model):
    return model.unet(UNET_X, torch.tensor([10, 500]), class_labels=torch.tensor([1, 3])).sample


def dit_modules(net):
    return [(block, block.attn1) for block in net.transformer_blocks]


def returns_its_input(module: nn.Module) -> None:
    """Make `module` (of a copy) return its hidden_states input; it stays in place, for DiT reads its first block's
    norm1.emb for the final layer's conditioning, so deleting block 0 would not be skipping it."""
    module.forward = lambda hidden_states, *args, **kwargs: hidden_states


def capture(module):
    """Records the hidden_states input and the output of every forward of `module`; returns (records, handle)."""
    records = []

    def hook(mod, args, kwargs, output):
        records.append((args[0] if args else kwargs["hidden_states"], output))

    return records, module.register_forward_hook(hook, with_kwargs=True)


def attention_by_hand(attn, hidden, query):
    """Multi-head softmax attention with queries `query` (batch, tokens or 1, dim) and keys and values of `hidden`,
    then the output projection (and its dropout, identity in eval)."""
    batch, heads = hidden.shape[0], attn.heads

    def split(t):
        return t.view(batch, -1, heads, t.shape[-1] // heads).transpose(1, 2)

    q, k, v = split(query), split(attn.to_k(hidden)), split(attn.to_v(hidden))
    weights = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(batch, -1, heads * v.shape[-1])
    return attn.to_out[1](attn.to_out[0](out))


def test_attention_identity_outputs_the_value_projection():
    """PAG (Ahn et al. 2024, "Self-Rectifying Diffusion Sampling with Perturbed-Attention Guidance"): the self-
    attention map is the identity, so attn1's output is to_out(to_v(h)), the perturbed path of diffusers'
    PAGIdentitySelfAttnProcessor2_0 (diffusers 0.42.1, src/diffusers/models/attention_processor.py: the class at
    line 5043, its perturbed path at lines 5114-5126: `hidden_states_ptb = attn.to_v(hidden_states_ptb)`, then
    `attn.to_out[0]`, `attn.to_out[1]`). Block 0 only: block 1's attention stays softmax attention."""
    net = tiny_dit()
    (rec0, h0), (rec1, h1) = capture(net.transformer_blocks[0].attn1), capture(net.transformer_blocks[1].attn1)
    with torch.no_grad():
        dit_out(net)
        with hooks.perturbed(dit_modules(net), Perturbation("attention_identity", (0,))):
            dit_out(net)
    h0.remove(), h1.remove()
    attn0, attn1 = net.transformer_blocks[0].attn1, net.transformer_blocks[1].attn1
    with torch.no_grad():
        (hidden, plain), (hidden_p, perturbed) = rec0
        torch.testing.assert_close(plain, attention_by_hand(attn0, hidden, attn0.to_q(hidden)))  # the hand forward
        torch.testing.assert_close(hidden_p, hidden)  # block 0's input is unchanged by its own perturbation
        torch.testing.assert_close(perturbed, attn0.to_out[1](attn0.to_out[0](attn0.to_v(hidden))))
        assert not torch.allclose(perturbed, plain, atol=1e-3)
        hidden1, out1 = rec1[1]
        torch.testing.assert_close(out1, attention_by_hand(attn1, hidden1, attn1.to_q(hidden1)))


def test_attention_blur_at_infinite_sigma_is_attention_to_the_mean_query():
    """SEG at sigma -> inf: every query is the mean query, so every token's output is the same softmax-weighted
    average of the values."""
    net = tiny_dit()
    records, handle = capture(net.transformer_blocks[1].attn1)
    with torch.no_grad():
        dit_out(net)
        with hooks.perturbed(dit_modules(net), Perturbation("attention_blur", (1,))):
            dit_out(net)
    handle.remove()
    attn = net.transformer_blocks[1].attn1
    (_, plain), (hidden, perturbed) = records
    with torch.no_grad():
        mean_query = attn.to_q(hidden).mean(dim=1, keepdim=True)
        expected = attention_by_hand(attn, hidden, mean_query).expand_as(perturbed)
    torch.testing.assert_close(perturbed, expected)
    assert not torch.allclose(plain[:, :1].expand_as(plain), plain, atol=1e-3)  # plain tokens differ, blurred don't


def test_attention_blur_at_finite_sigma_blurs_the_query_grid():
    """A finite sigma blurs the 4x4 grid of queries with a Gaussian (SEG-SDXL's kernel of ceil(6 sigma) rounded up to
    odd, reflect padding), as torchvision's gaussian_blur does; a tiny sigma leaves them as they are."""
    net = tiny_dit()
    to_q = net.transformer_blocks[0].attn1.to_q
    hidden = torch.randn(2, 16, to_q.in_features, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        plain = to_q(hidden)
        with hooks.perturbed(dit_modules(net), Perturbation("attention_blur", (0,), blur_sigma=0.5)):
            blurred = to_q(hidden)
        with hooks.perturbed(dit_modules(net), Perturbation("attention_blur", (0,), blur_sigma=1e-3)):
            sharp = to_q(hidden)
    grid = plain.transpose(1, 2).reshape(2, -1, 4, 4)
    expected = gaussian_blur(grid, kernel_size=[3, 3], sigma=[0.5, 0.5]).reshape(2, -1, 16).transpose(1, 2)
    torch.testing.assert_close(blurred, expected)
    assert torch.equal(sharp, plain) and not torch.allclose(blurred, plain, atol=1e-3)


@pytest.mark.parametrize("k", [0, 1])
def test_skip_block_equals_the_network_whose_block_returns_its_input(k):
    net = tiny_dit()
    without = copy.deepcopy(net)
    returns_its_input(without.transformer_blocks[k])
    with torch.no_grad(), hooks.perturbed(dit_modules(net), Perturbation("skip_block", (k,))):
        skipped = dit_out(net)
    with torch.no_grad():
        torch.testing.assert_close(skipped, dit_out(without), rtol=0, atol=0)
        assert not torch.allclose(skipped, dit_out(net), atol=1e-3)


def module_state(net: nn.Module):
    """What a perturbation could leave behind: each module's attributes (a leftover hook registry or instance
    forward), its processor, its parameters and buffers (the very tensors)."""
    return ({name: (sorted(vars(m)), getattr(m, "processor", None)) for name, m in net.named_modules()},
            {name: t for name, t in net.state_dict(keep_vars=True).items()})


@pytest.mark.parametrize("perturbation", KINDS, ids=lambda p: f"{p.kind}-{p.blocks}-{p.blur_sigma}")
@pytest.mark.parametrize("fail", [False, True], ids=["exit", "exception"])
def test_the_network_is_as_it_was_after_the_with(perturbation, fail):
    net = tiny_dit()
    with torch.no_grad():
        before, state = dit_out(net), module_state(net)
        values = {name: t.detach().clone() for name, t in state[1].items()}

        class Raised(Exception):
            pass

        try:
            with hooks.perturbed(dit_modules(net), perturbation):
                assert not torch.allclose(dit_out(net), before, atol=1e-3)  # the perturbation changes the output
                with hooks.perturbed(dit_modules(net), Perturbation("attention_identity", (0, 1))):  # nested
                    dit_out(net)
                if fail:
                    raise Raised
        except Raised:
            pass
        after_state = module_state(net)
        assert after_state[0] == state[0]
        assert all(after_state[1][name] is t and torch.equal(t, values[name]) for name, t in state[1].items())
        assert not any("_diffusers_hook" in vars(m) or "forward" in vars(m) for m in net.modules())
        assert torch.equal(dit_out(net), before)


def test_unet_attention_identity_matches_diffusers_pag_processor():
    """The UNet family declares its self-attention layers (down, mid, up: forward order). The identity in the mid
    block's attention (block 1) gives what diffusers' PAGIdentitySelfAttnProcessor2_0 gives for the perturbed half
    of a doubled batch (group norm, value and output projections, residual, rescale), and its original half is the
    plain forward."""
    model = tiny_unet_model()
    unet = model.unet
    assert [id(b) for b in model.parts().blocks] == [id(unet.down_blocks[0].attentions[0]), id(unet.mid_block.attentions[0]),
                                               id(unet.up_blocks[1].attentions[0]), id(unet.up_blocks[1].attentions[1])]
    assert all(dict(zip(map(id, model.parts().blocks), model.parts().attention))[id(b)] is b for b in model.parts().blocks)
    pag = copy.deepcopy(model)
    pag.parts().blocks[1].set_processor(PAGIdentitySelfAttnProcessor2_0())
    with torch.no_grad():
        plain = unet_out(model)
        with hooks.network_perturbed(model, Perturbation("attention_identity", (1,))):
            ours = unet_out(model)
        theirs = pag.unet(torch.cat([UNET_X] * 2), torch.tensor([10, 500] * 2),
                          class_labels=torch.tensor([1, 3] * 2)).sample
    torch.testing.assert_close(theirs[:2], plain)
    torch.testing.assert_close(ours, theirs[2:])
    assert not torch.allclose(ours, plain, atol=1e-4)


def test_unet_skip_block_returns_the_attention_input():
    model = tiny_unet_model()
    without = copy.deepcopy(model)
    returns_its_input(without.unet.mid_block.attentions[0])
    with torch.no_grad():
        with hooks.network_perturbed(model, Perturbation("skip_block", (1,))):
            skipped = unet_out(model)
        torch.testing.assert_close(skipped, unet_out(without), rtol=0, atol=0)
        assert not torch.allclose(skipped, unet_out(model), atol=1e-4)


def test_a_model_without_blocks_or_a_bad_index_is_one_clear_line():
    with pytest.raises(UserError) as err:
        hooks.network_perturbed(ToyDenoiser(), Perturbation("attention_identity", (0,)))  # raises at the call, before any `with`
    message = str(err.value)
    assert "\n" not in message and "self-attention blocks" in message and "ToyDenoiser has none" in message
    with pytest.raises(UserError, match=r"block 2 is out of range; model network has 2 blocks \(0\.\.1\)$"):
        hooks.perturbed(dit_modules(tiny_dit()), Perturbation("skip_block", (0, 2)))
    with pytest.raises(UserError, match="unknown network perturbation"):
        Perturbation("attention_softmax", (0,))
    with pytest.raises(UserError, match="blur_sigma > 0"):
        Perturbation("attention_blur", (0,), blur_sigma=0.0)


def test_latent_dit_perturbed_through_the_denoiser():
    """LatentDiT declares DiT's transformer blocks and their attn1; `denoiser.perturbed` perturbs its forward."""
    net = tiny_dit()
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16], latent_channels=4,
                        norm_num_groups=4, sample_size=16)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").config
    model = LatentDiT(net, vae, scheduler).eval()
    assert model.parts().blocks == list(net.transformer_blocks)
    assert all(dict(zip(map(id, model.parts().blocks), model.parts().attention))[id(b)] is b.attn1 for b in model.parts().blocks)
    without = copy.deepcopy(net)
    returns_its_input(without.transformer_blocks[0])
    reference = LatentDiT(without, vae, scheduler).eval()
    x, labels = INPUTS["hidden_states"], INPUTS["class_labels"]
    with torch.no_grad():
        plain = model.predict(x, 500, labels).eps
        with hooks.network_perturbed(model, Perturbation("skip_block", [0])):
            skipped = model.predict(x, 500, labels).eps
        torch.testing.assert_close(skipped, reference.predict(x, 500, labels).eps)
        assert not torch.allclose(skipped, plain, atol=1e-4)
        assert torch.equal(model.predict(x, 500, labels).eps, plain)
    with pytest.raises(UserError, match="model LatentDiT has 2 blocks"):
        hooks.network_perturbed(model, Perturbation("attention_identity", (-1,)))
    assert math.isinf(Perturbation("attention_blur", (0,)).blur_sigma)
