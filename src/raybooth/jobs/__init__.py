"""Whole jobs made of the layers' steps: `raybooth run` (one subject: run.py, outcome.py) and
`raybooth batch` / `raybooth sweep` (many subjects or many settings at once: batch.py and the rest)."""
