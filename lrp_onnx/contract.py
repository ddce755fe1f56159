"""The converted model's contract: names of the inputs and outputs the conversion adds (docs/contract.md).

Inputs: lrp_target and lrp_position (int64, feed -1 for the default: the argmax, the last position),
or lrp_seed instead of both (option seed_input). Outputs: lrp_selected_target, lrp_selected_logit
(what was explained, per row), and lrp_logits_at_position with relevance_only. Plain constants only, so
every stage (canonicalize, seed, the runner, the session helpers) reads them from here.
"""
from __future__ import annotations

import numpy as np

TARGET_INPUT = "lrp_target"
POSITION_INPUT = "lrp_position"
SEED_INPUT = "lrp_seed"
SELECTED_TARGET = "lrp_selected_target"
SELECTED_LOGIT = "lrp_selected_logit"
SELECTED_OUTPUT = "lrp_logits_at_position"  # relevance_only: the head's output at lrp_position (canonicalize.py)

INPUT_FORMS = ("plain", "optional")
DEFAULTED_INPUTS = (TARGET_INPUT, POSITION_INPUT)


def default_value(name: str, rank: int) -> np.ndarray:
    """What to feed to `name` (lrp_target / lrp_position) for its default: -1 (the argmax, the last
    position) in an int64 array of `rank` dimensions of size 1 (rank 1, or 2 with multi_target)."""
    return np.full([1] * max(rank, 1), -1, dtype=np.int64)
