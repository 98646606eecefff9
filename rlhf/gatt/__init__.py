"""Ghost Attention (Llama 2, Sec. 3.3). ``config`` (torch-free), ``checks`` (does an answer follow
an instruction), ``stage`` (``run(cfg) -> Path``)."""
