import json
import struct

from diffguide.logging import wandb as wandb_logger


def read_wandb_records(path):
    """The records of an offline run file, decoded with wandb's own protobuf schema (wandb.proto).

    Written here because wandb >= 0.19 moved its Python reader of the file into the Go core: the file is a LevelDB
    log (7-byte ':W&B' header, 32 KiB blocks, records framed by crc32/length/type, FULL=1 FIRST=2 MIDDLE=3 LAST=4),
    each record one serialised wandb_internal_pb2.Record."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # block trailer padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if kind == 0:
            pos += left - 7
            continue
        pending += data[pos:pos + length]
        pos += length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_offline_run_records_config_metrics_and_group(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = wandb_logger.WandbLogger(project="diffguide-test")
    logger.start({"guidance": {"_target_": "diffguide.guidance.cfg.CFG", "scale": 2.5}}, tmp_path,
                 "guidance=cfg,scale=2.5", "sweep-2026")
    logger.progress({"images": 10})
    logger.finish({"fid_fmnist": 12.25, "class_accuracy": 0.875}, None)
    [run_file] = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    records = read_wandb_records(run_file)
    by_type = {}
    for record in records:
        by_type.setdefault(record.WhichOneof("record_type"), []).append(record)
    [run] = by_type["run"]
    assert run.run.run_group == "sweep-2026" and run.run.display_name == "guidance=cfg,scale=2.5"
    assert run.run.project == "diffguide-test" and run.run.job_type == "sample"
    config = {item.key: json.loads(item.value_json) for item in run.run.config.update}
    assert config["guidance"] == {"_target_": "diffguide.guidance.cfg.CFG", "scale": 2.5}
    history = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
               for r in by_type["history"]]
    assert any(row.get("progress/images") == 10 for row in history)
    assert any(row.get("fid_fmnist") == 12.25 and row.get("class_accuracy") == 0.875 for row in history)
    summary = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
               for r in by_type["summary"] for item in r.summary.update}
    assert summary["fid_fmnist"] == 12.25 and summary["class_accuracy"] == 0.875


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


def test_a_resumed_point_continues_its_wandb_run(tmp_path, monkeypatch):
    """Two attempts in one folder log to one W&B run (an id from the folder, resume="allow"); another folder is
    another run."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    ids = []
    for folder in ("point", "point", "other"):
        logger = wandb_logger.WandbLogger(project="diffguide-test")
        logger.start({}, tmp_path / folder, folder, None)
        logger.finish({}, None)
        [run_file] = sorted((tmp_path / folder / "wandb").glob("offline-run-*/run-*.wandb"),
                            key=lambda p: p.stat().st_mtime)[-1:]
        [run] = [r for r in read_wandb_records(run_file) if r.WhichOneof("record_type") == "run"]
        ids.append(run.run.run_id)
    expected = wandb_logger.run_id(tmp_path / "point", "diffguide-test", None)
    assert ids[0] == ids[1] == expected and ids[2] != expected
    import hashlib

    assert expected == "dg" + hashlib.sha256(f"/diffguide-test:{(tmp_path / 'point').resolve()}".encode()).hexdigest()[:22]
