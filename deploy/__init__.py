"""eventcast deploy package."""
