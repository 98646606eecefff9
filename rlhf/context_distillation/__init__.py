"""Safety context distillation (Llama 2, Sec. 4.2.4). ``config`` (torch-free), ``stage``
(``run(cfg) -> Path``)."""
