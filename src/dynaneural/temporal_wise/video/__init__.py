"""video methods."""
