"""The app DSL, its graph IR and the optimizer passes (not built yet: see issue 4)."""
