"""A server written the way btx's iserver.py is: one JSON request per
connection, a fresh SharedMemory per event, unlink on ACK, one DONE per
worker. It serves synthetic frames instead of psana so it runs anywhere,
and logs one `served EVENT` line per frame so tests can count requests.

Run from tests/: python -m btx.iserver PORT WORKERS
"""
import json
import signal
import socket
import sys
from multiprocessing import Process, shared_memory

import numpy as np

from psana_ipc.server.sources.synthetic import expected


def unlink_shared_memory(shm_name):
    try:
        shm = shared_memory.SharedMemory(name=shm_name)
        shm.close()
        shm.unlink()
    except FileNotFoundError:
        pass


def worker_process(server_socket):
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        try:
            connection, _ = server_socket.accept()
            request_data = connection.recv(4096).decode("utf-8")
            if request_data == "DONE":
                connection.close()
                break
            request = json.loads(request_data)
            data = expected(request["detector_name"], request.get("mode") or "calib",
                            request["event"])
            shm = shared_memory.SharedMemory(create=True, size=data.nbytes)
            shared_array = np.ndarray(data.shape, dtype=data.dtype, buffer=shm.buf)
            shared_array[:] = data
            del shared_array
            connection.sendall(json.dumps({"name": shm.name, "shape": data.shape,
                                           "dtype": str(data.dtype)}).encode("utf-8"))
            print(f"served {request['event']}", flush=True)
            ack = connection.recv(1024).decode("utf-8")
            if ack == "ACK":
                unlink_shared_memory(shm.name)
            shm.close()
        except Exception as e:
            print(f"Unexpected error: {e}", flush=True)
            continue


def main(port, workers):
    server_socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server_socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server_socket.bind(("127.0.0.1", port))
    server_socket.listen()
    processes = [Process(target=worker_process, args=(server_socket,)) for _ in range(workers)]
    for p in processes:
        p.start()
    print("Server started", flush=True)
    for p in processes:
        p.join()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
