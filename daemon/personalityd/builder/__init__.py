"""The image builder: a personality from the base's own packages (`build --packages`)."""
