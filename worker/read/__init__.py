"""The read side: search, indexes, clustering and recommendation over the stored rows."""
