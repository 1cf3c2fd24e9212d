"""The backends and their life: state, health checks, managed processes, drain and reload."""
