"""A tiny calculator package the demo job tests and builds."""


def add(a: int, b: int) -> int:
    """Return the sum of a and b."""
    return a + b


def mean(values: list[float]) -> float:
    """Return the arithmetic mean of values (ValueError if empty)."""
    if not values:
        raise ValueError("mean of an empty list")
    return sum(values) / len(values)
