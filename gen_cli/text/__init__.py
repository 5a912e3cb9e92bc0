"""Text in and out: corpora, the byte-level BPE tokenizer, UTF-8-safe streaming of generated text."""
