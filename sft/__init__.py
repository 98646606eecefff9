"""Supervised fine-tuning (Llama 2-Chat, Sec. 3.1): loss on the answer tokens only, examples
packed into rows of ``max_length`` without attending to each other.

- ``sft.config``: the recipe model ``SFTConfig`` (torch-free).
- ``sft.packing``: ``pack_sequences`` / ``best_fit_rows``, also used to score chosen and rejected
  responses in one forward.
- ``sft.data``: examples -> packed rows with next-token targets; ``collate``; ``sft_loss``.
- ``sft.stage``: ``run(cfg) -> Path``, the stage.
"""
