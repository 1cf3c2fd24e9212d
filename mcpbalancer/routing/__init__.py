"""The routing decision: router, balancing strategies, rules, affinity, replay failover, binding."""
