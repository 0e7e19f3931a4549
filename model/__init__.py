"""eventcast model package."""
