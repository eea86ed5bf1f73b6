"""The FastAPI server (not built yet: `covey serve` arrives with the server issue)."""
