"""PPO (Llama 2, Sec. 3.2.3): the safety-gated reward with a per-token KL penalty, a critic,
GAE and clipped losses, on Accelerate.

``config`` (the recipe model, torch-free), ``losses`` (pure math), ``rollout`` (the critic's
and the reference's forwards), ``stage`` (the stage: ``run(cfg) -> Path``).
"""
