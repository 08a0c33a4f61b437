"""region methods."""
