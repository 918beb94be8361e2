"""Receiving files: the checks that refuse a file whole, lossless parsing, the raw tables."""
