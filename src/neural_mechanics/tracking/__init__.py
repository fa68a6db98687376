"""Online tracking of charges during training (Tracker), its segment reductions, and the run store."""
