"""FastFlow research harness: 2D normalizing flows on frozen backbone features (arXiv 2111.07677).

Layers, each a subpackage that imports only the layers before it (docs/architecture.md):
runtime -> data -> core -> engine -> pages -> tracking -> serve | study -> cli.
"""

__version__ = "0.1.0"
