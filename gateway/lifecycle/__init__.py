"""Policy: which models are resident and how each request reaches a ready one.

`supervisor` keeps the state table (one `runtime` record per model); `admission` bounds
concurrency and queues; `residency` and `budget` make room under memory budgets; `prober`
takes dead backends out; `stopper` drains; `placement` plans where a model's layers go.
"""
