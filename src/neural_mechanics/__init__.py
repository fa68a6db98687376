"""neural-mechanics: symmetries, conservation laws and their breaking in deep-learning dynamics.

    import neural_mechanics as nm
    sym = nm.find_symmetries(model, example_inputs)          # SymmetrySet
    nm.certify(model, sym, example_inputs)                   # group actions leave the loss unchanged?
    nm.check_constraints(model, loss_fn, (x, y), sym)        # gradient / Hessian constraints
    # all three take the same loss argument: "cross_entropy", "mse", a callable, or nm.LossSpec(...)
    with nm.Tracker(model, optimizer, sym, "runs/a") as t:   # charges vs exact and paper predictions
        ...
    nm.open_run("runs/a").frame()                            # long-form pandas DataFrame
    nm.write_report("runs/a")                                # one self-contained HTML file
    nm.register_op("mylib::my_relu", "pass_through")         # teach detection a custom op (docs/extending.md)
    print(nm.describe_graph(model, example_inputs))          # each op, its rule, what it blocked
    nm.param_groups(model, sym, weight_decay=5e-4)           # torch.optim groups: scale-invariant vs the rest
    nm.balance(model, sym); nm.equalize(model, sym)          # moves along the orbits (same function)
    nm.completeness(model, x, sym)                           # found k of n output-preserving directions
"""

from .constraints import ConstraintReport, check_constraints
from .errors import NMechError
from .plots.report import write_report
from .symmetry import KINDS, Member, Symmetry, SymmetrySet
from .symmetry.certify import CertificationReport, certify
from .symmetry.detect import describe_graph, find_symmetries
from .symmetry.loss import LossSpec
from .symmetry.ops import register_op, unregister_op
from .tracking.store import Run, open_run
from .tracking.tracker import Tracker
from .uses.alignment import Alignment, distance_up_to_symmetry
from .uses.balance import balance
from .uses.completeness import Completeness, completeness
from .uses.equalize import equalize
from .uses.orbits import SymmetryUseError
from .uses.param_groups import ParamSplit, classify_parameters, param_groups
from .uses.transforms import act

__version__ = "0.1.0"

__all__ = [
    "KINDS",
    "Alignment",
    "CertificationReport",
    "Completeness",
    "ConstraintReport",
    "LossSpec",
    "Member",
    "NMechError",
    "ParamSplit",
    "Run",
    "Symmetry",
    "SymmetrySet",
    "SymmetryUseError",
    "Tracker",
    "__version__",
    "act",
    "balance",
    "certify",
    "check_constraints",
    "classify_parameters",
    "completeness",
    "describe_graph",
    "distance_up_to_symmetry",
    "equalize",
    "find_symmetries",
    "open_run",
    "param_groups",
    "register_op",
    "unregister_op",
    "write_report",
]
