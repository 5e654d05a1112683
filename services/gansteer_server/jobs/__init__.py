"""Long jobs on Celery with Redis: job kinds, the job store, segmented execution, model backends and the worker.

- `kinds`: the job-kind registry (a kind = spec parsing + a call into `algorithms/` + checkpoint/progress);
  `inversion_job` is the first kind.
- `store`: job records, event streams, checkpoints and results in Redis (key layout in its docstring).
- `runner`: one task = one bounded segment of a job, with a lease, a delivery cap, cancellation and time limits.
- `backends`: where a job's models run, `local` (in the worker) or `remote` (through the services).
- `celery_app`: the Celery app from the settings (`Jobs`), `worker`: `gansteer-worker` and an in-thread worker.

The optimization service (`gansteer_server.servers.optimization`) submits jobs; workers run them.
"""
