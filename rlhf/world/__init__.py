"""The quickstart world: a small synthetic assistant world whose quality a gold judge scores
exactly (``rlhf.world.judge``), generated deterministically by ``rlhf.world.generate``."""
