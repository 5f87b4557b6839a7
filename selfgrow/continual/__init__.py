"""selfgrow.continual."""
