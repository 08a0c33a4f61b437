"""moe methods."""
