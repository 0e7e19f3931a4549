"""eventcast train package."""
