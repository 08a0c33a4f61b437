"""token methods."""
