"""A small dense linear solver in pure Python (the scheduler's and the simulator's least-squares fits).

Owns ``solve`` (Gaussian elimination with partial pivoting) and ``SingularSystem``.
Invariants: no torch, no numpy (``inlaid.core`` stays importable without them);
inputs are not modified; systems are tiny (the fits have 4-5 unknowns).
"""

from __future__ import annotations

from collections.abc import Sequence


class SingularSystem(ValueError):
    """The system has no unique solution: ``column`` has no usable pivot."""

    def __init__(self, column: int) -> None:
        super().__init__(f"singular system: no pivot in column {column}")
        self.column = column


def solve(a: Sequence[Sequence[float]], b: Sequence[float], tol: float = 1e-12) -> list[float]:
    """``x`` with ``a x = b`` for a square ``a``; ``SingularSystem`` when a pivot is below ``tol`` in magnitude."""
    n = len(b)
    m = [list(row) + [b[i]] for i, row in enumerate(a)]
    for col in range(n):
        piv = max(range(col, n), key=lambda r: abs(m[r][col]))
        if abs(m[piv][col]) < tol:
            raise SingularSystem(col)
        m[col], m[piv] = m[piv], m[col]
        for r in range(n):
            if r != col:
                f = m[r][col] / m[col][col]
                m[r] = [x - f * y for x, y in zip(m[r], m[col])]
    return [m[i][n] / m[i][i] for i in range(n)]
