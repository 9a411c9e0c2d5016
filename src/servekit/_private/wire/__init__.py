"""Between processes: framing and multiplexed RPC, authentication, TLS, and finding the
controller."""
