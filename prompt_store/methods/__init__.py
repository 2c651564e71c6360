"""The soft-prompt methods. Importing this package registers all of them."""

from prompt_store.methods import accept, gist, p_tuning, prefix_tuning, prompt_tuning  # noqa: F401
from prompt_store.methods.base import METHODS, Method, get_method
from prompt_store.methods.options import TRAINING_OPTIONS

__all__ = ["METHODS", "TRAINING_OPTIONS", "Method", "get_method"]
