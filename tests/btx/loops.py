"""The loops btx and pypca run around the dataset: a new DataLoader per
loading batch with NaN frames (events psana could not read) filtered out,
and the Ctrl-C handler that stops a server with one connect + DONE per
worker."""
import socket
import time

import numpy as np
import torch
from torch.utils.data import DataLoader


def load_without_nan_frames(dataset_class, server_address, requests_list, loading_batch_size,
                            num_workers):
    """All frames of `requests_list` that hold no NaN, as one array; the
    dataset class is btx's own or a drop-in (what a user changes by one import)."""
    kept = []
    for start in range(0, len(requests_list), loading_batch_size):
        dataset = dataset_class(server_address=server_address,
                                requests_list=requests_list[start:start + loading_batch_size])
        for batch in DataLoader(dataset, batch_size=4, num_workers=num_workers):
            batch = torch.as_tensor(batch)
            finite = ~torch.isnan(batch.reshape(len(batch), -1)).any(dim=1)
            kept.append(batch[finite].numpy())
    return np.concatenate(kept)


def send_done_per_worker(server_address, num_workers, pause=0.0):
    """btx's shutdown: for each worker, connect and send DONE. `pause` stands
    for a loaded machine between two connects."""
    for _ in range(num_workers):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as trigger_socket:
            trigger_socket.connect(server_address)
            trigger_socket.sendall(b"DONE")
        time.sleep(pause)
