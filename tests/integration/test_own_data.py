"""Training on a user's own images: class folders (conditional) and a flat folder (unconditional)."""
from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from pipeline.data.digits import load_digits
from pipeline.data.shards import write_shards
from pipeline.train import run
from tests.conftest import TINY, compose_train


def _image_folder(root: Path, *, with_classes: bool, n: int = 48) -> Path:
    images, labels = load_digits(16)
    for i in range(n):
        sub = root / f"class_{labels[i]}" if with_classes else root
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i], mode="L").save(sub / f"{i:03d}.png")
    return root


@pytest.mark.parametrize("with_classes", [True, False])
def test_train_on_gan_shards_output(tmp_path, with_classes):
    shards = tmp_path / "shards"
    manifest = write_shards(str(_image_folder(tmp_path / "images", with_classes=with_classes)), shards,
                            shard_size=20, progress=False)
    k = manifest["num_classes"]
    assert (k > 1) == with_classes
    cfg = compose_train(TINY + [
        "data=folder", f"data.source={shards}", "data.resolution=16", "data.channels=1", f"data.num_classes={k}",
        "~logger", "train.kimg=0.064", f"paths.output_dir={tmp_path}/out", "run.name=own",
        "train.sample_every_kimg=1", "train.ckpt_every_kimg=1", "model.generator.attn_resolutions=[]",
        "model.discriminator.attn_resolutions=[]", "train.samples_per_class=3"])
    run_dir, gan = run(cfg)
    assert gan.images_seen == 64 and gan.G.num_classes == k
    grid = Image.open(run_dir / "samples" / "final.png")
    assert grid.size[1] == max(k, 1) * 17 + 1  # one row per class, a single row when unconditional
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
