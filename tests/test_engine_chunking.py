"""Chunked scoring (``max_chunk``) gives exactly the numbers of one pass over the whole batch."""

from __future__ import annotations

import pytest
import torch

from worker.engine import EngineConfig, ReliabilityEngine
from worker.model.checkpoint import NormalizedModel, build_backbone


@pytest.mark.parametrize("attack", ["none", "fgsm"])
def test_chunked_scores_equal_one_pass(attack: str, single_thread: None) -> None:
    torch.manual_seed(0)
    model = NormalizedModel(build_backbone("resnet18", 2, 1), [0.5], [0.25]).eval()
    x = torch.rand(7, 1, 64, 64)
    cfg = EngineConfig(attack=attack)  # type: ignore[arg-type]
    whole = ReliabilityEngine(model, "backbone.layer4", config=cfg).score(x)
    chunked = ReliabilityEngine(model, "backbone.layer4", config=cfg, max_chunk=3).score(x)
    assert len(chunked) == 7
    for a, b in zip(whole.rows(), chunked.rows(), strict=True):
        for k, v in a.items():
            if v is None or isinstance(v, bool):
                assert b[k] == v
            else:
                assert b[k] == pytest.approx(v, abs=1e-5), k
    torch.testing.assert_close(whole.cam_agnostic, chunked.cam_agnostic, atol=1e-5, rtol=0)
    if attack == "fgsm":
        assert whole.x_adv is not None and chunked.x_adv is not None
        torch.testing.assert_close(whole.x_adv, chunked.x_adv, atol=1e-6, rtol=0)


def test_max_chunk_must_be_positive() -> None:
    model = NormalizedModel(build_backbone("resnet18", 2, 1), [0.5], [0.25]).eval()
    with pytest.raises(ValueError, match="max_chunk"):
        ReliabilityEngine(model, "backbone.layer4", max_chunk=0)
