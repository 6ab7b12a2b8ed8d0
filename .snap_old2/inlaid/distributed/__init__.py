"""Tensor parallelism over ``torch.distributed`` (see docs/tp.md).

- ``context``: ``init_tp`` and the ``TPContext`` handle (ranks, groups, collectives);
- ``sharding``: which slice of every weight a rank holds (pure shape math, no torch);
- ``launcher``: rank-0 driver and the worker processes of ranks 1..N-1.

Nothing here is imported by ``core/``; ``model/`` imports only ``context`` and ``sharding``.
"""

from inlaid.distributed.errors import TPWorkerError

__all__ = ["TPWorkerError"]
