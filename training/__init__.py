"""softserve training: trainers for the five soft-prompt methods, data, eval, and pushing artifacts.

Depends on `prompt_store` (the artifact contract) only, never on `server`.
"""
