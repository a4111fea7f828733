"""System tests: real ``hub serve`` processes, nginx, haproxy, Redis clusters, the bench."""
