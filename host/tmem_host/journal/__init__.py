"""tmem_host.journal: the persistent-pool journal that lets tmemd survive kill -9."""
