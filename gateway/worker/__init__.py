"""Code that runs inside a model's worker process (the only side that imports torch)."""
