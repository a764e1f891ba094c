"""Pure types and tables every part shares: host data, the snapshot, releases, the wire types."""
