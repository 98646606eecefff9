"""The per-token forwards only PPO needs: the critic's values and the frozen reference.
Packing and the policy's log-probabilities are ``rlhf.logprobs``'.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from rlhf.logprobs import PackedPolicy, PackedResponses


def critic_values(critic, batch: PackedResponses) -> torch.Tensor:
    """V(state before each response token), (K,): the reward model's head read at every
    position that predicts a response token instead of at the last token only."""
    return critic(batch.input_ids, batch.position_ids, batch.predict)


@contextmanager
def reference(policy: PackedPolicy, ref_model: PackedPolicy | None) -> Iterator[PackedPolicy]:
    """The frozen reference pi_0: ``ref_model``, or (LoRA) the policy with its adapter off."""
    if ref_model is not None:
        yield ref_model
        return
    with policy.model.disable_adapter():
        yield policy
