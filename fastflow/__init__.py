"""FastFlow research harness: 2D normalizing flows on frozen backbone features (arXiv 2111.07677)."""

__version__ = "0.1.0"
