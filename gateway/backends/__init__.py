"""Mechanics: starting, stopping and talking to whatever serves a model.

`launcher` starts a backend (our worker on a unix socket, an engine by command, or nothing for
a remote upstream); `engines/` holds started engines (vLLM is one preset); `upstream` is the
HTTP client; `envs`, `workerenv`, `threads` and `rundir` give a backend its Python, its
environment, its share of the cores and its files; `cluster/` deploys models onto a Ray
cluster instead (`serve --cluster`).
"""
