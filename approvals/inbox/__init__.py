"""The reviewers' approval inbox: pages (views), routes (urls) and its live socket (consumers)."""
