"""personalityd: stacks read-only personality volumes over a base OS with overlayfs."""

__version__ = "0.1.0"
