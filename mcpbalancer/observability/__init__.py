"""What the proxy tells its operators: the Prometheus metrics, the access log, the log format."""
