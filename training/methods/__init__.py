"""The five trainers. `build(name, model, tokenizer, **options)` makes one; `METHODS` lists them."""

from __future__ import annotations

import dataclasses
from typing import Any

from training.methods.accept import Accept, AcceptTrainConfig
from training.methods.base import TrainableMethod
from training.methods.gist import Gist, GistTrainConfig, compress
from training.methods.p_tuning import PTuning, PTuningTrainConfig
from training.methods.prefix_tuning import PrefixTuning, PrefixTuningTrainConfig
from training.methods.prompt_tuning import PromptTuning, PromptTuningTrainConfig

METHODS: dict[str, tuple[type[TrainableMethod], type[Any]]] = {
    "prompt_tuning": (PromptTuning, PromptTuningTrainConfig),
    "p_tuning": (PTuning, PTuningTrainConfig),
    "prefix_tuning": (PrefixTuning, PrefixTuningTrainConfig),
    "accept": (Accept, AcceptTrainConfig),
    "gist": (Gist, GistTrainConfig),
}


def config_for(name: str, **options: Any) -> Any:
    """The method's frozen config from keyword options; unknown options are errors, None means default."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    cfg_type = METHODS[name][1]
    fields = {f.name for f in dataclasses.fields(cfg_type)}
    unknown = sorted(k for k, v in options.items() if v is not None and k not in fields)
    if unknown:
        raise ValueError(f"{name} does not take {unknown}; its options are {sorted(fields)}")
    return cfg_type(**{k: v for k, v in options.items() if v is not None and k in fields})


def build(name: str, model: Any, tokenizer: Any, config: Any = None, **options: Any) -> TrainableMethod:
    """A fresh trainer of method `name` for a frozen base model."""
    cfg = config if config is not None else config_for(name, **options)
    return METHODS[name][0](model, tokenizer, cfg)


__all__ = ["METHODS", "TrainableMethod", "build", "compress", "config_for"]
