"""Fine-tuning jobs: training files and job records in the store's backend (disk or Redis), the huey queue,
and the worker that trains (`python -m jobs.worker`, `softserve worker`).

The server imports `jobs.backend`, `jobs.data`, `jobs.queue` and `jobs.records` (none of which imports
`training`); only `jobs.worker` imports the trainers, and it runs in its own process.
"""
