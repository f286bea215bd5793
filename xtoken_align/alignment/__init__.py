"""Stage 2, alignment: place each side's tokens on the text's bytes (`aligner`, with the fallbacks in
`nfc`), pair them into chunks (the numba `kernels`), and conversations under each tokenizer's own
chat template (`chat`)."""
