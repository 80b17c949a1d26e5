"""Reproducing the shipped base model: offline corpus, tokenizer, pretraining run."""
