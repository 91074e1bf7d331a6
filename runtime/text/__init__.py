"""Text: the tokenizer (Rust `tokenizers` + the chat template) and the incremental detokenizer
with stop-string matching. No torch."""
