"""Serving side: open a published generation and query it (``Searcher``), or from the shell (``retrieval-search``)."""

from retrieval_core.search.searcher import ModelMismatchError, Searcher, SearchResult

__all__ = ["ModelMismatchError", "SearchResult", "Searcher"]
