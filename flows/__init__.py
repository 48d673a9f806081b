"""Prefect flows over `r2m.pipeline`: the scheduled watcher and onboarding (docs/usage.md, "On a
schedule (Prefect)", "Training on a work pool").

`flows.continual` holds the flows and their tasks (each task one call into `r2m.pipeline`);
`python -m flows.serve` starts a local Prefect server and serves the watcher on a schedule;
`flows.pool` holds the training deployment of a work pool (`python -m flows.pool deploy`).

Importing the package sets r2m's thread policy before any flow module imports torch
(`r2m.threads`, docs/usage.md, "Running beside other jobs").
"""

from r2m.threads import set_thread_env

set_thread_env()
