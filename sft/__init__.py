"""Supervised fine-tuning (Llama 2-Chat, Sec. 3.1): loss on the answer tokens only, examples
packed into rows of ``max_length`` without attending to each other (``rlhf.packing``).

- ``sft.config``: the recipe model ``SFTConfig`` and the fine-tuning groups other stages reuse
  (torch-free).
- ``sft.data``: examples -> packed rows with next-token targets; ``collate``; ``sft_loss``.
- ``sft.stage``: ``run(cfg) -> Path``, the stage, and ``fine_tune``, the one fine-tuning path
  (rejection sampling, Ghost Attention and context distillation train through it).
"""
