"""The tmem guest agent: frontswap via NBD, cleancache via FUSE (stdlib-only)."""
