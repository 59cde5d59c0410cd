"""tmem_host.remote: the remote tier on a Redis Cluster (docs/REMOTE.md)"""
