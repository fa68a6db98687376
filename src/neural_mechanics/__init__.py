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

__version__ = "0.1.0"

__all__ = [
    "KINDS",
    "CertificationReport",
    "ConstraintReport",
    "LossSpec",
    "Member",
    "NMechError",
    "Run",
    "Symmetry",
    "SymmetrySet",
    "Tracker",
    "__version__",
    "certify",
    "check_constraints",
    "describe_graph",
    "find_symmetries",
    "open_run",
    "register_op",
    "unregister_op",
    "write_report",
]
