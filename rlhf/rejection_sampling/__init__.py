"""Rejection sampling with a best-so-far pool (Llama 2, Sec. 3.2.3). ``config`` (torch-free),
``pool`` (the best-so-far pool), ``report`` (Fig. 7 and 8), ``stage`` (``run(cfg) -> Path``)."""
