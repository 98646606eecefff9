"""Config models of the stages that live in the ``rlhf`` package (torch-free).

``sft/config.py`` and ``reward_model/config.py`` hold those stages' configs.
"""

from __future__ import annotations
