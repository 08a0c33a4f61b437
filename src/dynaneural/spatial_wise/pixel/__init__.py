"""pixel methods."""
