"""dynamic params methods."""
