"""CLI command groups, one module each; none imports torch at module level."""
