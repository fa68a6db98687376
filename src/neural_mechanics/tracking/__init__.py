"""Online tracking of charges during training: the Tracker (hooks), its optimizer strategies, sinks and run store."""
