"""Training recipes, one readable file per method."""
