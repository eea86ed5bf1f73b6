"""Example apps (not built yet: see issue 4)."""
