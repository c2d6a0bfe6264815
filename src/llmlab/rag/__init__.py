"""Retrieval-augmented generation: chunking, BM25 and dense search, fusion, reranking, cited answers, metrics."""
