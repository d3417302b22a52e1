"""What every chatmesh server shares, with no I/O: configuration, name rules, JSON-lines framing."""
