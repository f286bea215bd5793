"""xtoken-train: the FSDP2 reference trainer (docs/trainer.md).

The only part of xtoken that imports both `xtoken_align` (the collator, projection builds) and the
losses; `import xtoken_loss` does not import this subpackage.
"""
