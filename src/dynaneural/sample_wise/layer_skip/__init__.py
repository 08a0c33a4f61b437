"""layer skip methods."""
