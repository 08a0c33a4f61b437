"""dynamic width methods."""
