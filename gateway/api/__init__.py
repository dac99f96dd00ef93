"""The HTTP front door: what a request meets before any model does.

`routes/` parse bodies and hand them to `service` (limits, lease, forward, relay or translate);
`protocol` holds the wire models; `auth`, `middleware` and `connections` guard the door;
`metrics`, `metric_sources` and `worker_metrics` make /metrics.
"""
