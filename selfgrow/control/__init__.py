"""selfgrow.control."""
