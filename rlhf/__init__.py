"""rlhf: the Llama 2-Chat fine-tuning method as stage recipes (SFT, reward models, rejection
sampling, PPO, GAtt, context distillation, weekly rounds). ``import rlhf`` stays light."""

__version__ = "0.1.0"
