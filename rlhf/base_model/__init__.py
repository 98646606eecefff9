"""The base_model stage: a local checkpoint copied in, or a tokenizer trained in-process and a
randomly initialised Llama. ``config`` (torch-free), ``stage`` (``run(cfg) -> Path``)."""
