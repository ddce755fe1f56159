"""The graph itself: read-only view, node writer, shape and rank inference, validation, file writing."""
