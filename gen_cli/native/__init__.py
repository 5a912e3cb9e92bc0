"""The native CPU decode step: the C source, its build, its ABI, and the Python side that calls it."""
