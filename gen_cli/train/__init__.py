"""Training: token files, evaluation, run folders, arguments, distributed setup and the loop."""
