"""What faces clients: the proxy listener and its per-connection protocol, connection
tracking and the close spread, websockets, header rules and the sidecar's own answers."""
