"""tmem-testbed host side: tmemd, its store and NBD export, tmemctl, the VM launcher."""
