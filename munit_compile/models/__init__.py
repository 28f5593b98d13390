"""Small reference models used by the demo and tests."""

from munit_compile.models.gpt import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig"]
