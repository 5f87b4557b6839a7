"""selfgrow.adapters."""
