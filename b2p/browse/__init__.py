"""browse stage."""
