"""packrnn: recurrent networks over variable-length sequences that compute only the real steps.

The public API is re-exported here; see README.md for a tour.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
