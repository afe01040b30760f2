"""The lowest layer: the user-error classes and the file writes that cannot be left half done. Imports nothing of the project's, nor torch."""
