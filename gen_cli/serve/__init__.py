"""An OpenAI-compatible HTTP server over the continuous-batching scheduler (`gen serve`)."""
