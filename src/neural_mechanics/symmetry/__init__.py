"""Symmetry groups: what they are (kinds, groups), how they are found and certified."""

from .groups import Member, Symmetry, SymmetrySet
from .kinds import KINDS, Kind, get_kind

__all__ = ["KINDS", "Kind", "Member", "Symmetry", "SymmetrySet", "get_kind"]
