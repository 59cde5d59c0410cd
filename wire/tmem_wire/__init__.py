"""Wire protocols shared by host and guest: stdlib-only, sans-IO."""
