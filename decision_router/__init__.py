"""decision-router: from a model's prediction to an accountable action with a measured result."""

__version__ = "0.1.0"
