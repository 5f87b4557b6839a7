"""selfgrow.data."""
