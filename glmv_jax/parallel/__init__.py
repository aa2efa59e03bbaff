"""Meshes, logical-axis sharding rules and context parallelism."""
