"""Inference: the generation loop, sampling, and the fast paths (fusion, oneDNN, int8, compile, the native step)."""
