"""audio methods."""
