"""rimlab package."""
