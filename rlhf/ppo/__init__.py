"""PPO (Llama 2, Sec. 3.2.3): the safety-gated reward with a per-token KL penalty, a critic,
GAE and clipped losses, on Accelerate.

``config`` (the recipe model, torch-free), ``losses`` (pure math), ``rollout`` (packed forwards
of the policy, reference and critic), ``train`` (the stage: ``run(cfg) -> Path``).
"""
