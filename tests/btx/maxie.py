"""A client written the way maxie's IPC datasets are: an error reply is
logged (its `error`, then its `traceback`) and the item becomes None, which
the collate function drops; a reply with a frame is copied out of a
SharedMemory, which the client unlinks itself."""
import json
import logging
import socket

from torch.utils.data.dataloader import default_collate

from .iclient import IPCRemotePsanaDataset, copy_and_unlink

logger = logging.getLogger(__name__)


class MaxieIPCDataset(IPCRemotePsanaDataset):
    """Same dataset shape as btx's; only how a reply is read differs."""

    def fetch_event(self, exp, run, access_mode, detector_name, event):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.connect(self.server_address)
            sock.sendall(json.dumps({"exp": exp, "run": run, "access_mode": access_mode,
                                     "detector_name": detector_name, "event": int(event),
                                     "mode": "calib"}).encode("utf-8"))
            response_data = sock.recv(4096).decode("utf-8")
            result = None
            if len(response_data):
                response_json = json.loads(response_data)
                if "error" in response_json:
                    logger.debug(f"Server error: {response_json['error']}")
                    if response_json["traceback"] is not None:
                        logger.debug(response_json["traceback"])
                else:
                    result = copy_and_unlink(response_json)
                    sock.sendall(b"ACK")
            return result


def collate_skipping_none(batch):
    """maxie's collate: items that failed (None) are left out of the batch."""
    kept = [item for item in batch if item is not None]
    return default_collate(kept) if kept else None
