"""The model: its shape (ModelConfig), the transformer, the KV cache, and loading/saving model directories."""
