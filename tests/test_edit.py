"""`python -m diffguide.edit`: inversion, reconstruction and class editing on the tiny UNet and a tiny evaluator."""

import json

import numpy as np
import pytest
from PIL import Image

from diffguide import edit
from diffguide.data import fashion_mnist
from tests.helpers import run_cli


def _pngs(folder, n=2, size=(28, 28), mode="L"):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(folder / f"{i:02d}.png")
    return folder


@pytest.fixture
def base(tiny_unet_path, tiny_evaluator_path):
    return [f"model.weights={tiny_unet_path}", f"evaluator={tiny_evaluator_path}", "steps=3", "device=cpu"]


def test_null_text_edit_writes_edit_json_and_grid(base, tmp_path, capsys):
    out = tmp_path / "out"
    folder = _pngs(tmp_path / "pngs")
    code = edit.entry([*base, f"folder={folder}", "labels=[6,6]", "inversion=null_text", "inversion.inner_steps=2",
                       "edit.target=4", f"out_dir={out}"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["inversion"] == "null_text" and summary["num_images"] == 2 and summary["edit_target"] == 4
    result = json.loads((out / "edit.json").read_text())
    rec = result["reconstruction"]
    assert len(rec["psnr"]) == len(rec["ssim"]) == 2
    assert set(rec["psnr_mean"]) == {"mean", "lo", "hi"} and rec["psnr_mean"]["lo"] <= rec["psnr_mean"]["hi"]
    e = result["edit"]
    assert e["target"] == 4 and e["target_name"] == "Coat" and 0.0 <= e["accuracy"] <= 1.0
    for key in ("ssim_to_source", "feature_distance", "feature_distance_reconstruction"):
        assert len(e[key]) == 2 and e[f"{key}_mean"]["mean"] is not None
    nt = result["null_text"]
    assert len(nt["loss_before"]) == len(nt["loss_after"]) == 3
    assert result["nfe_per_image"]["regeneration"] == 6 and result["nfe_per_image"]["edit"] == 6
    assert result["images"] == ["00.png", "01.png"] and result["labels"] == [6, 6]
    assert result["wall_s"]["total"] > 0
    with Image.open(out / "grid.png") as grid:  # source / reconstruction / edit, 2 columns
        assert grid.size == (2 * 30 + 2, 3 * 30 + 2)


@pytest.mark.skipif(not all(fashion_mnist._find(n) for n in fashion_mnist._FILES["test"][:2]),
                    reason="Fashion-MNIST test split not installed")
def test_ddim_reconstruction_of_test_images(base, tmp_path, capsys):
    out = tmp_path / "out"
    assert edit.entry([*base, "images=[0,1]", "scale=2", f"out_dir={out}"]) == 0, capsys.readouterr().err
    result = json.loads((out / "edit.json").read_text())
    assert result["edit"] is None and result["null_text"] is None and result["labels_from"] == "test split"
    assert result["nfe_per_image"] == {"inversion": 6, "regeneration": 6, "edit": None}
    with Image.open(out / "grid.png") as grid:
        assert grid.size == (2 * 30 + 2, 2 * 30 + 2)


def test_bad_override_is_one_line_and_writes_nothing(base, tmp_path):
    out = tmp_path / "out"
    proc = run_cli("diffguide.edit", *base, "inversion.lrr=0.1", "inversion=null_text", f"out_dir={out}")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("diffguide: error: inversion.lrr is not a key"), proc.stderr
    assert "did you mean lr" in lines[0]
    assert proc.stdout == "" and not out.exists()


@pytest.mark.parametrize("overrides, needle", [
    (["edit.target=10"], "edit.target=10 is not a class"),
    (["edit.target=coat"], "edit.target='coat'"),
    (["images=[0,100000]"], "past the end of the test split"),
    (["folder={tmp}/missing"], "no such folder"),
    (["folder={tmp}/big"], "is 32x32"),
    (["folder={tmp}/rgb"], "not grayscale"),
    (["inversion=bogus"], "inversion=bogus is not an option"),
    (["inversion=null_text", "inversion.lr=0"], "inversion.lr=0"),
    (["device=tpu"], "device='tpu'"),
    (["precision=fp8"], "precision='fp8'"),
    (["steps=0"], "steps=0"),
    (["scale=-1"], "scale=-1"),
    (["spacing=log"], "spacing='log'"),
    (["model=gmm", "model.weights=null"], None),
])
def test_user_errors_are_one_line_before_any_work(base, tmp_path, capsys, overrides, needle):
    _pngs(tmp_path / "big", size=(32, 32))
    _pngs(tmp_path / "rgb", mode="RGB")
    out = tmp_path / "out"
    overrides = [o.replace("{tmp}", str(tmp_path)) for o in overrides]
    if overrides[0] == "model=gmm":  # the mixture: not Fashion-MNIST pixels (and no label embedding)
        overrides = ["model=gmm", *base[1:]]
        needle = "edit inverts Fashion-MNIST"
    code = edit.entry([*base, *overrides, f"out_dir={out}"] if overrides[0] != "model=gmm"
                      else [*overrides, f"out_dir={out}"])
    err = capsys.readouterr().err.splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("diffguide: error: ") and needle in err[0], err
    assert not (out / "edit.json").exists()


def test_null_text_on_a_model_without_label_embeddings_is_refused(tmp_path, capsys, monkeypatch, base):
    from diffguide.models.unet import UNetDenoiser

    real_parts = UNetDenoiser.parts

    def no_label_embeddings(self):
        parts = real_parts(self)
        parts.label_embeddings = []
        return parts

    monkeypatch.setattr(UNetDenoiser, "parts", no_label_embeddings)
    out = tmp_path / "out"
    assert edit.entry([*base, "inversion=null_text", "images=[0]", f"out_dir={out}"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "null_text" in err[0] and "has none" in err[0], err
    assert not out.exists() or not any(out.iterdir())
