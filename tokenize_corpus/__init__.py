"""Stages 1 and 2: train the VQ-KD visual tokenizer and tokenize an image corpus with it."""
