"""Every random draw derives from (run seed, purpose, step, index): no global RNG state.

A step, a shard or a direction can therefore be replayed by any process (a resumed
run, a restarted worker) from integers alone.
"""

from __future__ import annotations

import numpy as np

_PURPOSES = {"batch": 1, "allocation": 2, "queries": 3, "direction": 4, "score_probes": 5}


def derive_seed(seed: int, purpose: str, *indices: int) -> int:
    """A 63-bit seed that is a pure function of its arguments."""
    entropy = [int(seed), _PURPOSES[purpose], *map(int, indices)]
    return int(
        np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32).view(np.uint64)[0] >> 1
    )
