import json
import math

import pytest
import torch

from rlhf.artifacts import StageRun
from rlhf.config import RecipeError, StageConfig, TrainConfig
from rlhf.training import (
    epoch_order, lr_factor, make_accelerator, micro_batches, plan_steps, train_loop, warmup_steps,
)
from tiny import Crash, toy_collate, toy_regression


def test_cosine_schedule_hand_worked():
    # total 10 steps, warmup 2: steps 0,1 -> 1/2, 2/2; then cosine over steps 2..9 (7 intervals)
    # to min 0.1: step 2 -> 1.0, step 9 -> 0.1, midpoint step 5.5 -> 0.1 + 0.9 * 0.5 = 0.55
    f = lambda s: lr_factor(s, total=10, warmup=2, schedule="cosine", min_ratio=0.1)  # noqa: E731
    assert [f(0), f(1), f(2)] == [0.5, 1.0, 1.0]
    assert f(9) == pytest.approx(0.1)
    assert f(5) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 3 / 7)))
    assert lr_factor(7, 10, 0, "linear", 0.0) == pytest.approx(1 - 7 / 9)
    assert lr_factor(7, 10, 0, "constant", 0.0) == 1.0


def test_warmup_is_three_percent_at_least_five():
    cfg = TrainConfig(warmup_ratio=0.03, min_warmup_steps=5)
    assert warmup_steps(100, cfg) == 5  # 3 < 5
    assert warmup_steps(1000, cfg) == 30
    assert warmup_steps(3, cfg) == 3  # never more than the run


def test_plan_and_partition():
    cfg = TrainConfig(batch_size=4, micro_batch_size=1, epochs=2.5)
    assert plan_steps(10, cfg) == (2, 5)  # 10 // 4 = 2 per epoch, 2.5 epochs
    assert plan_steps(10, cfg.model_copy(update={"max_steps": 3})) == (2, 3)
    with pytest.raises(RecipeError, match="batch_size: 4 is more than the 3"):
        plan_steps(3, cfg)
    batch = [7, 3, 9, 1, 4, 0, 2, 8]
    assert micro_batches(batch, rank=1, world=2, micro=2) == [[4, 0], [2, 8]]
    assert micro_batches(batch, rank=0, world=1, micro=4) == [[7, 3, 9, 1], [4, 0, 2, 8]]
    assert epoch_order(8, 0, 1) == epoch_order(8, 0, 1) != epoch_order(8, 0, 2)
    assert sorted(epoch_order(8, 0, 1)) == list(range(8))


def _train(tmp_path, name, crash_after=None, **train):
    model, items = toy_regression()
    calls = {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += 1
        if crash_after is not None and calls["n"] > crash_after:
            raise Crash
        x, y = batch
        return ((model(x) - y) ** 2).sum(), {"big": (y.abs() > 1).float().sum()}

    cfg = TrainConfig(lr=1e-2, batch_size=8, micro_batch_size=4, epochs=2, save_every=2, **train)
    run = StageRun(StageConfig(stage="toy", output_dir=tmp_path / name)).start()
    metrics = train_loop(run, model, items, toy_collate, loss_fn, cfg, seed=0, accelerator=make_accelerator(cfg))
    return model, metrics, run


def test_resumed_run_equals_uninterrupted(tmp_path):
    reference, ref_metrics, _ = _train(tmp_path, "a")
    assert ref_metrics["steps"] == 6 and 0 <= ref_metrics["big"] <= 1
    with pytest.raises(Crash):
        _train(tmp_path, "b", crash_after=2 * 3 + 1)  # 2 micro-batches a step: dies in step 4
    resumed, metrics, run = _train(tmp_path, "b")  # continues from the step-2 checkpoint
    for p, q in zip(reference.parameters(), resumed.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    assert metrics["loss"] == pytest.approx(ref_metrics["loss"], abs=1e-6)
    steps = [line for line in (run.dir / "metrics.jsonl").read_text().splitlines()]
    assert [json.loads(line)["step"] for line in steps] == [1, 2, 3, 4, 5, 6]  # step 3 logged once
