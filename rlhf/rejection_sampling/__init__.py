"""Rejection sampling with a best-so-far pool (Llama 2, Sec. 3.2.3). ``config`` (torch-free),
``stage`` (``run(cfg) -> Path``)."""
