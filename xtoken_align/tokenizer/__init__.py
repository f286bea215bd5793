"""Stage 1, tokenizers: read any tokenizer into canonical token bytes (`loader`, `canonical_bytes`,
`special_roles`), the bundled fixtures (`fixtures`), and vocabulary overlap statistics (`overlap`)."""
