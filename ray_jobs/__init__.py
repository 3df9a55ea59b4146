"""Entry points for `ray job submit` (thin: parse arguments, call pipeline / data_prep)."""
