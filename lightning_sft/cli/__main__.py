"""``python -m lightning_sft.cli``: the ``lightning-sft`` command without the installed script."""

from lightning_sft.cli import main

main()
