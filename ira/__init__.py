"""IRA: Integrated Reasoning with Audio."""

__version__ = "0.1.0"
