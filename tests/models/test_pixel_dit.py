"""The embedded transformer (diffguide/models/dit.py PixelDiT, model=fmnist_dit): DiT's initialisation, label
dropout done once by the trainer, training and the checkpoint round trip, the network hooks on its blocks, and the
committed weights against their recipe."""

import copy

import pytest
import torch
from omegaconf import OmegaConf

from diffguide.models import hooks
from diffguide.store import checkpoint
from diffguide.command.config import CONF_DIR
from diffguide.models import dit as dit_lib
from diffguide.models.hooks import Perturbation
from diffguide.training.recipes import diffusion_loss, train_dit
from tests.helpers import ROOT, SCHEDULE, toy_images

TINY_DIT = dict(sample_size=28, in_channels=1, out_channels=1, patch_size=4, num_layers=2, num_attention_heads=2,
                attention_head_dim=8, norm_type="ada_norm_zero")


def _inputs(batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 1, 28, 28, generator=g), torch.randint(0, 1000, (batch,), generator=g),
            torch.randint(0, 11, (batch,), generator=g))


def test_a_fresh_dit_starts_as_the_zero_map_with_dits_own_initialisation():
    """facebookresearch/DiT models.py, DiT.initialize_weights: "Zero-out adaLN modulation layers in DiT blocks" and
    "Zero-out output layers" (final_layer.adaLN_modulation and final_layer.linear), "Initialize label embedding
    table" N(0, 0.02), "Initialize timestep embedding MLP" N(0, 0.02). So the fresh network outputs exactly 0 and
    its eps loss is the noise's own mean square."""
    torch.manual_seed(0)
    model = dit_lib.build(TINY_DIT, 10, SCHEDULE)
    x, t, y = _inputs()
    assert torch.equal(model.raw_output(x, t, y), torch.zeros(4, 1, 28, 28))
    net = model.transformer
    for block in net.transformer_blocks:
        assert not block.norm1.linear.weight.any() and not block.norm1.linear.bias.any()
        table = block.norm1.emb.class_embedder.embedding_table.weight
        assert table.shape == (11, TINY_DIT["num_attention_heads"] * TINY_DIT["attention_head_dim"])  # + null row
        assert 0.01 < table.std().item() < 0.03
    assert not net.proj_out_2.weight.any() and not net.proj_out_1.weight.any()
    images, labels = toy_images(16)
    x0 = images.float() / 127.5 - 1
    g = torch.Generator().manual_seed(5)
    loss = diffusion_loss(model, x0, labels % 10, 0.0, g)
    assert abs(loss.item() - 1.0) < 0.2 and loss.item() > 0


def test_the_network_drops_no_labels_itself_in_training_mode():
    """diffusers' LabelEmbedding.forward drops labels when `self.training and self.dropout_prob > 0`, a separate
    torch.rand draw in every block; the trainer drops each sample's label once (diffusion_loss), so build() turns the
    in-network dropout off and keeps the null row (label num_classes)."""
    torch.manual_seed(0)
    model = dit_lib.build(TINY_DIT, 10, SCHEDULE)
    for p in model.transformer.parameters():
        if not p.any():
            p.data.normal_(0, 0.3)
    model.train()
    x, t, y = _inputs()
    first = model.raw_output(x, t, y)
    assert torch.equal(first, model.raw_output(x, t, y))
    null = model.raw_output(x, t, torch.full_like(y, 10))
    assert not torch.allclose(first, null)


def test_training_lowers_the_loss_and_the_checkpoint_reproduces_the_network(tmp_path):
    cfg = OmegaConf.create(dict(seed=0, steps=6, batch_size=32, lr=2e-3, warmup_steps=1, weight_decay=0.0,
                                ema_decay=0.0, label_dropout=0.1, log_every=1, checkpoint_every=0, precision="fp32",
                                out=str(tmp_path / "d.safetensors"), num_classes=10, dit=TINY_DIT,
                                scheduler=SCHEDULE))
    images, labels = toy_images(64)
    logged = []
    model, stats = train_dit(cfg, images, labels % 10, torch.device("cpu"), log=logged.append)
    assert stats["final_loss"] < stats["first_loss"] and len(logged) == 6
    reloaded = dit_lib.load_pixel(cfg.out)
    x, t, y = _inputs(seed=3)
    expected = copy.deepcopy(model)
    for state in expected.transformer.state_dict().values():  # the checkpoint stores the state dict in fp16
        state.copy_(state.half().float())
    diff = (reloaded.raw_output(x, t, y) - expected.raw_output(x, t, y)).abs().max().item()
    assert diff == 0, diff
    assert reloaded.null_class == 10 and reloaded.sample_shape == (1, 28, 28) and reloaded.data_range == (-1.0, 1.0)


def test_the_perturbation_hooks_act_on_its_blocks_and_leave_it_unchanged():
    torch.manual_seed(0)
    model = dit_lib.build(TINY_DIT, 10, SCHEDULE).eval()
    for p in model.transformer.parameters():
        if not p.any():
            p.data.normal_(0, 0.3)
    x, t, y = _inputs()
    before = model.raw_output(x, t, y)
    assert [m is b.attn1 for b, m in zip(model.parts().blocks, model.parts().attention)] == [True, True]
    for kind in ("attention_identity", "attention_blur", "skip_block"):
        with hooks.network_perturbed(model, Perturbation(kind, (1,))):
            assert not torch.allclose(model.raw_output(x, t, y), before, atol=1e-4), kind
        assert torch.equal(model.raw_output(x, t, y), before), kind


def test_the_committed_weights_are_the_recipes_network():
    """diffguide/weights/fmnist_dit.safetensors holds the network conf/train/fmnist_dit.yaml describes (its card
    records the run), and conf/model/fmnist_dit.yaml loads it."""
    _, config = checkpoint.load(ROOT / "diffguide" / "weights" / "fmnist_dit.safetensors", dit_lib.KIND)
    recipe = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "train" / "fmnist_dit.yaml"))
    assert {k: config["dit"][k] for k in recipe["dit"]} == recipe["dit"]
    assert config["scheduler"]["beta_schedule"] == recipe["scheduler"]["beta_schedule"]
    assert config["training"]["steps"] == recipe["steps"]
    model = dit_lib.load_pixel(str(ROOT / "diffguide" / "weights" / "fmnist_dit.safetensors"))
    assert sum(p.numel() for p in model.parameters()) == config["training"]["parameters"] == 4605508
    assert len(model.parts().blocks) == recipe["dit"]["num_layers"]
    assert "dit.load_pixel" in (CONF_DIR / "model" / "fmnist_dit.yaml").read_text()
