"""A sharding config that does not shard says so: on a machine without GPUs accelerate drops the
FSDP and DeepSpeed plugins and runs plain DDP (or one process), exit 0."""

import pytest
import torch

from rlhf.config import TrainConfig
from rlhf.training import make_accelerator, sharding_fallback


def test_the_fallback_names_the_config_and_what_runs_instead():
    fsdp = sharding_fallback({"ACCELERATE_USE_FSDP": "true"}, "MULTI_CPU", 2)
    assert fsdp.startswith("the accelerate config asks for FSDP (distributed_type: FSDP), but plain DDP over 2 CPU "
                           "processes runs instead")
    assert "nothing is sharded" in fsdp
    assert "a single process runs instead" in sharding_fallback({"ACCELERATE_USE_DEEPSPEED": "True"}, "NO", 1)
    assert sharding_fallback({"ACCELERATE_USE_FSDP": "true"}, "FSDP", 8) is None  # honoured
    assert sharding_fallback({"ACCELERATE_USE_DEEPSPEED": "true"}, "DEEPSPEED", 8) is None
    assert sharding_fallback({}, "MULTI_CPU", 2) is None  # DDP asked, DDP runs


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU accelerate honours the config")
def test_a_stage_launched_with_the_fsdp_config_on_cpus_warns(monkeypatch, capsys):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch --config_file fsdp.yaml` sets
    accelerator = make_accelerator(TrainConfig())
    assert accelerator.distributed_type.value != "FSDP"
    assert "[rlhf] warning: the accelerate config asks for FSDP" in capsys.readouterr().out
