"""Resources: what a worker offers (``--resources gpu=2,mem=256``) and what a task needs
(``ex.options(resources={"gpu": 1})``). Names and amounts are the user's; a task runs only where the
free amounts cover its needs, and holds them while it runs.

Runs anywhere: in user threads (options), in the client's I/O thread (scheduling), in the
supervisor's loop thread (its own accounting) and in the ``zmqexecutor`` command (parsing).
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping

Amounts = dict[str, float]

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")


def check_amounts(value: Any, what: str) -> Amounts:
    """``value`` as amounts by name (positive, finite numbers; names of letters, digits, ``_.-``), or
    a ValueError / TypeError naming ``what``."""
    if not isinstance(value, Mapping):
        raise TypeError(f"{what} must be a mapping of names to amounts, such as {{'gpu': 1}}, "
                        f"not {type(value).__name__}")
    amounts: Amounts = {}
    for name, amount in value.items():
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ValueError(f"{what}: {name!r} is not a resource name (letters, digits, '_', '.', '-')")
        if not isinstance(amount, (int, float)) or isinstance(amount, bool):
            raise TypeError(f"{what}: the amount of {name!r} must be a number, not {type(amount).__name__}")
        if not math.isfinite(amount) or amount <= 0:
            raise ValueError(f"{what}: the amount of {name!r} must be a positive number, not {amount!r}")
        amounts[name] = float(amount)
    return amounts


def parse_resources(text: str) -> Amounts:
    """``gpu=2,mem=256`` as amounts; a ValueError says what is wrong."""
    amounts: dict[str, Any] = {}
    for part in text.split(","):
        name, equals, amount = part.strip().partition("=")
        if not equals or not name.strip():
            raise ValueError(f"expected NAME=AMOUNT[,NAME=AMOUNT...] such as gpu=2,mem=256, got {text!r}")
        try:
            amounts[name.strip()] = float(amount)
        except ValueError:
            raise ValueError(f"the amount of {name.strip()!r} must be a number, got {amount.strip()!r}") from None
    return check_amounts(amounts, "--resources")


def covers(free: Mapping[str, float], needs: Mapping[str, float]) -> bool:
    """Whether ``free`` amounts leave room for ``needs``."""
    return all(free.get(name, 0.0) >= amount for name, amount in needs.items())


def take(in_use: Amounts, needs: Mapping[str, float]) -> None:
    for name, amount in needs.items():
        in_use[name] = in_use.get(name, 0.0) + amount


def give_back(in_use: Amounts, needs: Mapping[str, float]) -> None:
    for name, amount in needs.items():
        left = in_use.get(name, 0.0) - amount
        if left > 1e-9:
            in_use[name] = left
        else:
            in_use.pop(name, None)


def free_of(total: Mapping[str, float], in_use: Mapping[str, float]) -> Amounts:
    return {name: amount - in_use.get(name, 0.0) for name, amount in total.items()}


def describe(amounts: Mapping[str, float]) -> str:
    """``gpu=2, mem=256``; ``none`` when empty."""
    return ", ".join(f"{name}={amount:g}" for name, amount in sorted(amounts.items())) or "none"
