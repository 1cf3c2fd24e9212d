"""Operating-system processes: the worker supervisor, and children that die with their parent."""
