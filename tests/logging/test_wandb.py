import pytest

from diffguide.logging import wandb as wandb_logger


def test_offline_run_records_config_metrics_and_group(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = wandb_logger.WandbLogger(project="diffguide-test")
    logger.start({"guidance": {"_target_": "diffguide.guidance.cfg.CFG", "scale": 2.5}}, tmp_path,
                 "guidance=cfg,scale=2.5", "sweep-2026")
    logger.progress({"images": 10})
    logger.finish({"fid_fmnist": 12.25, "class_accuracy": 0.875}, None)
    [run_file] = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    data = run_file.read_bytes()
    for expected in (b"fid_fmnist", b"class_accuracy", b"progress/images", b"sweep-2026", b"guidance=cfg,scale=2.5",
                     b"diffguide.guidance.cfg.CFG", b"12.25"):
        assert expected in data, expected


def test_no_credentials_means_offline(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    assert not wandb_logger._has_credentials()
    logger = wandb_logger.WandbLogger()
    logger.start({}, tmp_path, "job", None)
    assert logger.run is not None and logger.run.settings.mode == "offline"
    logger.finish({}, None)


def test_a_wandb_failure_never_fails_the_run(tmp_path, monkeypatch, capsys):
    import wandb

    def broken_init(*args, **kwargs):
        raise RuntimeError("service unreachable")

    monkeypatch.setattr(wandb, "init", broken_init)
    logger = wandb_logger.WandbLogger()
    logger.start({}, tmp_path, "job", None)
    logger.progress({"images": 1})
    logger.finish({"fid_fmnist": 1.0}, None)
    assert "W&B init failed (RuntimeError: service unreachable)" in capsys.readouterr().err
