"""Predictions for the charges: exact discrete-time recurrences, the paper's continuous formulas, equilibria."""
