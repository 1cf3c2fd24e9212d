"""Features that act on a request: Origin checks and CORS."""
