"""sequence methods."""
