"""The TIES test vector that the methods' hand-computed cases share: a base and three task vectors of six entries."""

TASK_VECTORS = [
    [0.5, -0.2, 0.1, 0.0, 0.3, -0.05],
    [-0.4, -0.3, 0.05, 0.2, 0.0, 0.1],
    [0.3, 0.1, -0.6, 0.0, -0.1, 0.02],
]
BASE = [1.0, -1.0, 0.5, 2.0, 0.0, 3.0]
