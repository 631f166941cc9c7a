"""The psana-ipc wire format, shared by server and client.

Pure standard library and free of sockets (sans-I/O): bytes go in, messages
come out, so every edge case is a plain unit test.
"""
PROTOCOL_VERSION = 1
