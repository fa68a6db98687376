"""`python -m neural_mechanics.cli ...` runs `nmech` (torchrun launches it this way)."""

from . import main

main()
