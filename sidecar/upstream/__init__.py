"""What faces the app: how to reach it, one HTTP/1.1 connection, the keep-alive pool and
one request/response exchange over it."""
