"""Validated layer: CLD Release 2 rules, rejections, data-quality flags and reports."""
