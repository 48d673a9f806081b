"""Prefect flows over `r2m.pipeline`: the scheduled watcher and onboarding (SPEC section 9).

`flows.continual` holds the flows and their tasks (each task one call into `r2m.pipeline`);
`python -m flows.serve` starts a local Prefect server and serves the watcher on a schedule;
`flows.pool` holds the training deployment of a work pool (`python -m flows.pool deploy`).
"""
