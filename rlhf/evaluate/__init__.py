"""Policies compared on held-out prompts: rewards, win rates, KL, gold scores. ``config``
(torch-free), ``stage`` (``run(cfg) -> Path``)."""
