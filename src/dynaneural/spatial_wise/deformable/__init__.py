"""deformable methods."""
