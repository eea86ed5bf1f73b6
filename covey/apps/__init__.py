"""Example apps built on the DSL, each a module with a ready `App` and a `build_*` factory:

- `rag_chatbot`: the default app, multi-turn RAG over the Python docs with citations
  (`RagChatbot` keeps per-session history);
- `advanced_rag`: query expansion, parallel retrieval, reciprocal-rank fusion, one answer;
- `mapreduce_summary`: split a long text, summarize the pieces in parallel, combine;
- `tool_agent`: answers with a calculator and a Python-docs search it calls mid-generation
  (`python -m covey.apps.tool_agent "What is 17 * 23?"`).

Run any of them with `Runtime(llm, retrievers={DEFAULT_INDEX_NAME: index}).run(app, ...)`:
the retrieving apps search the index bound under `DEFAULT_INDEX_NAME` (from
`covey.retrieval.default_corpus`).
"""
