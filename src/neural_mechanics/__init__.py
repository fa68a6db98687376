"""neural-mechanics: symmetries, conservation laws and their breaking in deep-learning dynamics.

    import neural_mechanics as nm
    symmetries = nm.find_symmetries(model, example_inputs)
"""

from .symmetry import KINDS, Member, Symmetry, SymmetrySet

__version__ = "0.1.0"

__all__ = ["KINDS", "Member", "Symmetry", "SymmetrySet", "__version__"]
