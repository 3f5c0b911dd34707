"""Fast CPU paths (chunked torch, compiled where it pays), one module per op (issue 16's layout)."""
