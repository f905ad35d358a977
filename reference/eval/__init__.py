"""Toy-scale evaluation like the paper's: mini-GenEval for generation, answer accuracy for understanding."""
