"""The methods' training options: the one list of names that `softserve-train train` flags, fine-tuning jobs'
hyperparameters (jobs.records) and the trainers' configs (training.methods) share. Each method takes its own
subset; an option a method does not take is refused by `training.methods.config_for`."""

from __future__ import annotations

TRAINING_OPTIONS: tuple[str, ...] = (
    "num_virtual_tokens",
    "init",
    "init_text",
    "encoder_type",
    "encoder_hidden_size",
    "projection",
    "projection_hidden_size",
    "num_subspaces",
    "num_codewords",
    "added_length",
    "added_subspaces",
    "added_codewords",
    "weight_lr",
    "codebook_lr",
    "added_lr",
    "num_gist_tokens",
)
