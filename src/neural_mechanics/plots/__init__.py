"""The paper's figures and the HTML report (from a run directory or a live run)."""
