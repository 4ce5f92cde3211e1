"""Break: ``enqueue --run-model`` computes the line's call by squashing every image, even for
a checkpoint trained with ``--resize pad``: the score sent is not the model's P(defect) (the
worker's, the lab's), and the prediction it derives can be the wrong class."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from tests.support.models import tiny_checkpoint

pytestmark = pytest.mark.usefixtures("single_thread")


def test_run_model_fits_images_as_the_checkpoint_says(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import producer.api
    from inspection_audit.cli import main
    from worker.model.checkpoint import load_checkpoint, p_defect_from_logits
    from worker.model.preprocess import preprocess

    ckpt = tiny_checkpoint(tmp_path, size=(32, 96), seed=4, name="pad.pt")
    raw = torch.load(ckpt, weights_only=True)
    raw["resize"] = "pad"
    torch.save(raw, ckpt)
    pm = load_checkpoint(ckpt)
    assert pm.resize == "pad"
    img_dir = tmp_path / "img"
    img_dir.mkdir()
    rng = np.random.default_rng(0)
    image = img_dir / "part.png"
    Image.fromarray(rng.integers(0, 256, (120, 60), dtype=np.uint8)).save(image)

    sent: list[Any] = []

    def capture(messages: Any, **_kw: Any) -> list[str]:
        sent.extend(messages)
        return [m.inspection_id for m in messages]

    monkeypatch.setattr(producer.api, "enqueue_many", capture)
    monkeypatch.setenv("INSPECTION_AUDIT_HOME", str(tmp_path / "home"))
    result = CliRunner().invoke(main, ["enqueue", str(image), "--run-model", str(ckpt)])
    assert result.exit_code == 0, result.output
    x = preprocess(image, pm.input_size, pm.in_channels, resize=pm.resize)[None]
    with torch.no_grad():
        want = float(p_defect_from_logits(pm.model(x), pm.defect_index)[0])
    assert sent[0].score == pytest.approx(want, abs=1e-6)
