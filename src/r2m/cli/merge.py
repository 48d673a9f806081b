"""`r2m merge`: training-free merging of specialists (issue 4)."""

from r2m.cli import command, not_implemented


@command("merge")
def merge() -> None:
    """Merge specialists into one detector with WA, TA, TIES, CART or R²M."""
    not_implemented("merge")
