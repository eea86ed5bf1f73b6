"""The asyncio executor that runs optimized plans (not built yet: see issue 4)."""
