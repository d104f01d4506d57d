"""`gan-eval` end to end on a checkpoint of a short real run; fit-features; the training callback; errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers.logger import Logger

from pipeline.data.shards import read_manifest
from pipeline.metrics.callback import MetricsCallback
from pipeline.metrics.cli import main
from pipeline.metrics.domain_net import load_domain_net
from pipeline.metrics.errors import EvalError
from pipeline.metrics import scores
from pipeline.metrics.features import extract_features, load_feature_net
from pipeline.metrics.inception import WEIGHTS_URL
from pipeline.metrics.real_data import dataset_checksum, real_batches
from tests.conftest import ROOT, TINY, compose_train

GAN_EVAL = str(Path(sys.executable).with_name("gan-eval"))


class SpyLogger(Logger):
    """Records what is logged (the run itself has no logger)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[dict] = []

    @property
    def name(self) -> str:
        return "spy"

    @property
    def version(self) -> str:
        return "0"

    def log_metrics(self, metrics, step=None) -> None:
        self.records.append(dict(metrics))

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass


class AttachLogger(L.Callback):
    def __init__(self, logger: Logger) -> None:
        self.logger = logger

    def setup(self, trainer, pl_module, stage) -> None:
        trainer.loggers = [self.logger]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """fit-features (3 epochs) on digits, then 64 images of BigGAN training with the metrics callback."""
    from pipeline.train import run as train_run

    root = tmp_path_factory.mktemp("gan_eval")
    cache, net_path = root / "cache", root / "digits-net.pt"
    t0 = time.perf_counter()
    fit = _main(["fit-features", "--data", "digits", "--cache-dir", str(cache), "--out", str(net_path),
                 "--epochs", "3", "--no-progress"])
    fit_seconds = time.perf_counter() - t0
    cfg = compose_train(TINY + [f"paths.output_dir={root}", f"paths.cache_dir={cache}", "run.name=short",
                                "train.kimg=0.064", "train.ckpt_every_kimg=0.064", "train.sample_every_kimg=1",
                                "~logger", "model.ema.start_step=1"])
    spy = SpyLogger()
    callback = MetricsCallback(every_kimg=0.032, metrics=["fid", "intra_fid", "accuracy"], num_samples=300,
                               feature_net=str(net_path), best_metric="fid", cache_dir=str(cache), batch_size=150,
                               at_start=False)  # kimg 0 is covered by the gan-train test
    run_dir, _ = train_run(cfg, callbacks=[callback, AttachLogger(spy)])
    return {"root": root, "cache": cache, "net": net_path, "fit": fit, "fit_seconds": fit_seconds,
            "run_dir": run_dir, "ckpt": run_dir / "checkpoints" / "last.ckpt", "callback": callback, "spy": spy}


def _main(argv: list[str]) -> dict:
    """Run the CLI in this process; returns its one JSON line."""
    from io import StringIO
    from contextlib import redirect_stdout

    out = StringIO()
    with redirect_stdout(out):
        assert main(argv) == 0
    lines = out.getvalue().strip().splitlines()
    assert len(lines) == 1, lines
    return json.loads(lines[0])


def test_fit_features_reaches_90_percent_and_saves_plain_data(run):
    fit, net_path = run["fit"], run["net"]
    assert fit["heldout_accuracy"] > 0.90 and fit["num_heldout"] == 359 and fit["num_train"] == 1438
    record = torch.load(net_path, weights_only=True)  # plain data, no pickled code
    assert record["arch"] == {"channels": 1, "resolution": 32, "num_classes": 10, "width": 16}
    assert record["id"] == fit["id"] and record["heldout_accuracy"] == fit["heldout_accuracy"]
    assert record["dataset"]["checksum"] == dataset_checksum(read_manifest(run["cache"] / "digits-32"))
    net, info = load_domain_net(net_path)  # recomputes the content id
    assert net.num_features == 64 and info["training"]["epochs"] == 3
    # The accuracy path end to end on real images (train and held-out): near the held-out accuracy.
    fnet = load_feature_net(net_path)
    _, logits, labels = extract_features(fnet, real_batches(run["cache"] / "digits-32", 600), progress=False)
    assert scores.accuracy(logits, labels) > 0.9


def test_corrupt_feature_net_fails_its_checksum(run, tmp_path):
    record = torch.load(run["net"], weights_only=True)
    record["state_dict"]["head.bias"] += 0.01
    bad = tmp_path / "bad.pt"
    torch.save(record, bad)
    with pytest.raises(EvalError, match="fails its checksum"):
        load_feature_net(bad)


def test_callback_logs_records_and_keeps_the_best_checkpoint(run):
    run_dir, callback = run["run_dir"], run["callback"]
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["kimg"] for r in lines] == [0.032, 0.064]
    for r in lines:
        assert {"fid", "intra_fid", "accuracy", "intra_fid/9"} <= set(r["metrics"])
        assert r["protocol"]["num_samples"] == 300 and r["protocol"]["generator"] == "G_ema"
        assert r["protocol"]["feature_net"]["id"] == run["fit"]["id"] and r["protocol"]["world_size"] == 1
    assert Path(lines[0]["protocol"]["reference"]["cache"]).is_file()  # gan-eval below reads it (from_cache)
    logged = [r for r in run["spy"].records if "metrics/fid" in r]
    assert [r["metrics/fid"] for r in logged] == [r["metrics"]["fid"] for r in lines]
    best = min(lines, key=lambda r: r["metrics"]["fid"])
    assert callback.best["value"] == best["metrics"]["fid"] and callback.best["kimg"] == best["kimg"]
    ckpt = torch.load(run_dir / "checkpoints" / "best.ckpt", weights_only=True)
    assert ckpt["counters"]["images_seen"] == round(best["kimg"] * 1000)
    assert json.loads((run_dir / "checkpoints" / "best.eval.json").read_text())["value"] == best["metrics"]["fid"]
    last = torch.load(run["ckpt"], weights_only=True)  # the best value survives a resume
    assert any(state.get("best") == callback.best for state in last["callbacks"].values())


def test_gan_eval_end_to_end(run):
    env = {**os.environ, "GAN_PIPELINE_CACHE": str(run["cache"])}
    t0 = time.perf_counter()
    proc = subprocess.run([GAN_EVAL, str(run["ckpt"]), "--num-samples", "400", "--feature-net", str(run["net"]),
                           "--kid-subsets", "5", "--no-progress"], capture_output=True, text=True, env=env,
                          cwd="/", timeout=300)
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, "stdout must be exactly one JSON object"
    result = json.loads(lines[0])
    assert json.loads(run["ckpt"].with_suffix(".eval.json").read_text()) == result  # written beside the checkpoint
    values, proto = result["metrics"], result["protocol"]
    assert set(values) >= {"fid", "kid", "kid_std", "precision", "recall", "intra_fid", "accuracy"}
    assert all(v == v for v in values.values()), "NaN in the metrics"
    assert 0 <= values["precision"] <= 1 and 0 <= values["accuracy"] <= 1 and values["fid"] > 0
    assert proto["generator"] == "G_ema" and proto["kimg"] == 0.064 and proto["num_samples"] == 400
    assert proto["feature_net"]["id"] == run["fit"]["id"] and proto["reference"]["num_real"] == 1797
    assert proto["reference"]["from_cache"], "the callback had already cached these real features"
    print(f"\ngan-eval wall {wall:.1f} s (in-process work {result['wall_seconds']} s), fit-features "
          f"{run['fit_seconds']:.1f} s at {run['fit']['heldout_accuracy']:.4f}; fid {values['fid']:.2f} "
          f"intra_fid {values['intra_fid']:.2f} accuracy {values['accuracy']:.3f}")


def test_use_g_truncation_and_the_default_digits_network(run, tmp_path):
    cache = tmp_path / "cache"
    (cache / "metrics").mkdir(parents=True)
    # The default for the embedded digits is the domain network in the cache (fitted there on first use).
    (cache / "metrics" / "domain-digits-32.pt").write_bytes(run["net"].read_bytes())
    out = tmp_path / "eval.json"
    result = _main([str(run["ckpt"]), "--use-g", "--truncation", "0.5", "--num-samples", "200", "--metrics",
                    "fid,pr", "--data", str(run["cache"] / "digits-32"), "--cache-dir", str(cache), "--out", str(out),
                    "--no-progress"])
    assert set(result["metrics"]) == {"fid", "precision", "recall"}
    assert result["protocol"]["generator"] == "G"
    assert result["protocol"]["truncation"] == {"value": 0.5, "kind": "z_threshold"}
    assert result["protocol"]["feature_net"]["path"] == str(cache / "metrics" / "domain-digits-32.pt")
    assert json.loads(out.read_text()) == result


@pytest.mark.parametrize("args, message", [
    (["{root}/missing.ckpt"], "CHECKPOINT {root}/missing.ckpt does not exist"),
    (["{net}"], "has no state_dict and config"),
    (["{ckpt}", "--metrics", "fid,is"], "--metrics='fid,is': choose from"),
    (["{ckpt}", "--num-samples", "0"], "--num-samples=0 must be at least 1"),
    (["{ckpt}", "--truncation", "-1"], "--truncation=-1.0 must be > 0"),
    (["{ckpt}", "--feature-net", "inception"], WEIGHTS_URL),
    (["{ckpt}", "--feature-net", "{root}/pt_inception.pth"], "does not exist"),
    (["{ckpt}", "--feature-net", "{root}/wrong.pth"], "fail the checksum"),
    (["fit-features", "--data", "/nowhere", "--out", "{root}/x.pt"], "--data='/nowhere'"),
])
def test_bad_input_names_the_argument_and_exits_2(run, args, message, capsys, monkeypatch):
    root = run["root"]
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(1)}, root / "wrong.pth")  # fails its sha256 first
    monkeypatch.delenv("GAN_PIPELINE_INCEPTION_SHA256", raising=False)
    monkeypatch.delenv("GAN_PIPELINE_INCEPTION", raising=False)
    fill = {"root": str(root), "net": str(run["net"]), "ckpt": str(run["ckpt"])}
    argv = [a.format(**fill) for a in args] + (["--cache-dir", str(run["cache"])] if args[0] != "fit-features" else [])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("gan-eval: error: ") and message.format(**fill) in err, err
    assert "Traceback" not in err


def test_console_script_exit_code_without_traceback(run, capsys):
    proc = subprocess.run([GAN_EVAL, str(run["root"] / "missing.ckpt")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr
    with pytest.raises(SystemExit) as exit_:
        main(["fit-features", "--help"])
    assert exit_.value.code == 0 and "--epochs" in capsys.readouterr().out


_DDP_WORKER = '''
import hashlib, json, sys
from pathlib import Path
import torch
import pipeline.metrics.callback as cbm
from pipeline.train import run
from tests.conftest import compose_train

hashes = []
_fake_features = cbm.fake_features
def spy(*args, **kwargs):  # what this rank generated and embedded
    feats, logits, labels = _fake_features(*args, **kwargs)
    hashes.append(hashlib.sha1(feats.numpy().tobytes()).hexdigest())
    return feats, logits, labels
cbm.fake_features = spy
out, net, cache = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
cb = cbm.MetricsCallback(every_kimg=0.064, metrics=["fid", "intra_fid", "accuracy"], num_samples=301, feature_net=net,
                         best_metric="fid", cache_dir=cache, batch_size=151, at_start=False)
run(compose_train(sys.argv[4:]), callbacks=[cb])
rank = torch.distributed.get_rank()
(out / f"cb{rank}.json").write_text(json.dumps({"best": cb.best, "history": cb.history, "hashes": hashes}))
'''


@pytest.mark.distributed
def test_callback_under_torchrun_gathers_every_rank_and_agrees_on_the_best(run, tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(_DDP_WORKER)
    overrides = TINY + ["train.kimg=0.064", "~logger", "run.name=ddp", f"paths.output_dir={tmp_path}",
                        f"paths.cache_dir={run['cache']}", "train.sample_every_kimg=1", "train.ckpt_every_kimg=1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(29500 + (os.getpid() + 7) % 1000), str(worker), str(tmp_path), str(run["net"]),
           str(run["cache"]), *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = (json.loads((tmp_path / f"cb{r}.json").read_text()) for r in (0, 1))
    assert r0["hashes"][0] != r1["hashes"][0], "both ranks generated the same samples"
    assert r0["best"] == r1["best"] and r0["best"]["kimg"] == 0.064  # broadcast: one decision on every rank
    assert len(r0["history"]) == 1 and r1["history"] == []  # rank 0 scores and records
    record = r0["history"][0]
    # 301 samples in 2 equal slices of 151; the scores use all 302 of them.
    assert record["protocol"]["num_samples"] == 302 and record["protocol"]["world_size"] == 2
    assert sum(record["protocol"]["intra_fid"]["fake_per_class"]) == 302
    assert (tmp_path / "ddp" / "checkpoints" / "best.ckpt").is_file()
    lines = (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["metrics"] == record["metrics"]


def test_per_class_run_checkpoints_its_statistics_and_gan_eval_takes_standing_stats(run, tmp_path):
    """gan-train with per-class cBN statistics and grouped labels, then gan-eval with standing statistics."""
    from pipeline.train import run as train_run

    cfg = compose_train(TINY + [f"paths.output_dir={tmp_path}", f"paths.cache_dir={run['cache']}", "run.name=pc",
                                "train.kimg=0.064", "train.ckpt_every_kimg=0.064", "train.sample_every_kimg=1",
                                "~logger", "model.generator.cbn_stats=per_class",
                                "model.fake_labels.grouping=grouped", "model.fake_labels.samples_per_class=4",
                                "train.standing_stats=2"])
    run_dir, gan = train_run(cfg)
    assert sorted(p.name for p in (run_dir / "samples").glob("*.png"))  # grids with standing statistics
    # ... made on a copy: G_ema still holds the statistics it copied from G
    assert torch.equal(gan.G_ema.blocks[0].bn1.class_updates, gan.G.blocks[0].bn1.class_updates)
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    # 4 D steps (16 real images each) with a G step every 2nd: 6 label draws, all counted for resume.
    assert ckpt["counters"]["label_draws"] == gan.label_draws == 6
    updates = ckpt["state_dict"]["G_ema.blocks.0.bn1.class_updates"]
    assert updates.sum() > 0 and ckpt["state_dict"]["G_ema.blocks.0.bn1.class_running_mean"].shape == (10, 32)
    out = tmp_path / "eval.json"
    result = _main([str(run_dir / "checkpoints" / "last.ckpt"), "--standing-stats", "3", "--batch-size", "40",
                    "--num-samples", "200", "--metrics", "fid,accuracy", "--feature-net", str(run["net"]),
                    "--cache-dir", str(run["cache"]), "--out", str(out), "--no-progress"])
    assert result["protocol"]["standing_stats"] == {"batches": 3, "batch_size": 40}
    assert result["metrics"]["fid"] > 0 and 0 <= result["metrics"]["accuracy"] <= 1
    with pytest.raises(SystemExit):  # argparse: not a number
        main([str(run_dir / "checkpoints" / "last.ckpt"), "--standing-stats", "many"])
    assert main([str(run_dir / "checkpoints" / "last.ckpt"), "--standing-stats", "-1", "--no-progress",
                 "--feature-net", str(run["net"]), "--cache-dir", str(run["cache"])]) == 2
