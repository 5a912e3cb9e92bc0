"""gen: a command-line lab for fast language-model inference."""

__version__ = "0.1.0"
