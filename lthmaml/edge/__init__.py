"""The edge path: the compact artifact (export, load), the fine-tune module, ``lthmaml-edge`` and the
Raspberry Pi profile."""
