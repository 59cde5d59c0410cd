"""Guest workloads and attack tools, run inside a guest and reused by the host
(stdlib-only; may import tmem_wire and the agent's tmem_guest.channel, the
agent never imports this package)."""
