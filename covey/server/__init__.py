"""covey's HTTP server: a REST endpoint per app, an OpenAI-compatible API, metrics and the
RAG chatbot's chat page, on FastAPI + uvicorn (`covey serve`)."""
