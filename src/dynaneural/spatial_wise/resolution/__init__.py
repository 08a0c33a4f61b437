"""resolution methods."""
