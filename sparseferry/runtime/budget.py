"""Memory budgets: "4GiB", "512MB", "1.5 G", 123456789 (bytes) or "30%" of the checkpoint's stored weights."""
from __future__ import annotations

import re

from ..errors import SparseferryError

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}
_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*|%)\s*$")


class BudgetError(SparseferryError):
    """A memory budget that does not parse, or is too small (then `minimum_bytes` says what would do)."""

    def __init__(self, message: str, minimum_bytes: int | None = None):
        super().__init__(message)
        self.minimum_bytes = minimum_bytes


def parse_budget(budget, total_bytes: int | None = None) -> int | None:
    """Bytes of a budget. None means unlimited. A percentage needs `total_bytes` (the stored weights).

    Decimal units (KB, MB, GB: powers of 1000) and binary units (KiB, MiB, GiB: powers of 1024); a
    bare K/M/G is decimal.
    """
    if budget is None:
        return None
    if isinstance(budget, bool):
        raise BudgetError(f"memory budget {budget!r} is not a size")
    if isinstance(budget, (int, float)):
        if budget <= 0:
            raise BudgetError(f"memory budget must be positive, got {budget}")
        return int(budget)
    m = _RE.match(str(budget))
    if not m:
        raise BudgetError(f"memory budget {budget!r} does not parse (expected e.g. '4GiB', '512MB', '30%')")
    value, unit = float(m.group(1)), m.group(2).lower()
    if unit == "%":
        if total_bytes is None:
            raise BudgetError(f"memory budget {budget!r}: a percentage needs the model size")
        if not 0 < value <= 100:
            raise BudgetError(f"memory budget {budget!r}: a percentage must be in (0, 100]")
        return int(total_bytes * value / 100)
    if unit not in _UNITS:
        raise BudgetError(f"memory budget {budget!r}: unknown unit {m.group(2)!r} (use B, KB, MB, GB, KiB, MiB, GiB or %)")
    n = int(value * _UNITS[unit])
    if n <= 0:
        raise BudgetError(f"memory budget must be positive, got {budget!r}")
    return n


def format_bytes(n: int | float) -> str:
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"
