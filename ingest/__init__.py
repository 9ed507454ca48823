"""Ingest: files to rows. Loads documents, chunks them in the embedder's tokens, embeds, and keeps
them in a sqlite-vec + FTS5 index that the query path searches.

Imports `inference` (the embedder, the data dir) and nothing of `rag`; never imports mlx.
Map: `cli` -> `pipeline` -> (`scan`, `loaders/`, `chunking`) -> `protocols` <- `store`.
"""
