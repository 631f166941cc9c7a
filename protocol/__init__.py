"""The psana-ipc wire format, shared by server and client.

Pure standard library and sans-I/O: bytes and text go in, messages come out;
no sockets, files, directories or environment (tests/unit/test_protocol_purity.py
checks the source), so every edge case is a plain unit test.
"""
PROTOCOL_VERSION = 2
