"""The btx client's IPCRemotePsanaDataset, unchanged in behaviour: a new
connection per event, SharedMemory attach, copy, unlink, ACK."""
import json
import socket
from multiprocessing import shared_memory

import numpy as np
from torch.utils.data import Dataset


class IPCRemotePsanaDataset(Dataset):
    def __init__(self, server_address, requests_list):
        self.server_address = server_address
        self.requests_list = requests_list

    def __len__(self):
        return len(self.requests_list)

    def __getitem__(self, idx):
        request = self.requests_list[idx]
        return self.fetch_event(*request)

    def fetch_event(self, exp, run, access_mode, detector_name, event):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.connect(self.server_address)
            request_data = json.dumps({
                'exp': exp,
                'run': run,
                'access_mode': access_mode,
                'detector_name': detector_name,
                'event': event,
                'mode': 'calib',
            })
            sock.sendall(request_data.encode('utf-8'))
            response_data = sock.recv(4096).decode('utf-8')
            response_json = json.loads(response_data)
            result = copy_and_unlink(response_json)
            sock.sendall("ACK".encode('utf-8'))
            return result


def copy_and_unlink(response_json):
    """The frame a reply names, copied out of its SharedMemory, which is then
    closed and unlinked whatever happened."""
    shm = None
    try:
        shm = shared_memory.SharedMemory(name=response_json['name'])
        data_array = np.ndarray(response_json['shape'], dtype=np.dtype(response_json['dtype']),
                                buffer=shm.buf)
        result = np.array(data_array)
        del data_array
    finally:
        if shm:
            shm.close()
            shm.unlink()
    return result
