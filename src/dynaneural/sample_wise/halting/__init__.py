"""halting methods."""
