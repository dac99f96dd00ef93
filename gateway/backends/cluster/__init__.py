"""`serve --cluster`: models as Ray Serve deployments, the gateway still the front door.

`connect` joins (or starts) the cluster; `launcher` deploys a model as a Serve application
and is the supervisor's `Launcher` there; `replica` is what runs on a node (the model's
usual backend, started by that node's own launcher); `transport` carries the gateway's
HTTP exchanges over Serve handles; `resources` says what a replica asks the scheduler for.
Ray is imported only when a cluster is in use.
"""
