"""personalityctl: the D-Bus client and the image builder."""
