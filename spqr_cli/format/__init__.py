"""The packed checkpoint on disk: the spec and strict reader, pack/unpack, inspect."""
