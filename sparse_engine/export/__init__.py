"""Export: extraction of trained models into compact inference modules, and their file format."""
