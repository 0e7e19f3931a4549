"""eventcast stream package."""
