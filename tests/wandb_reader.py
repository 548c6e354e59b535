"""Reading an offline W&B run file (run-*.wandb) back in tests: what a run logged, without a server."""

import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2


def read_records(path: Path) -> list:
    """The protobuf records of a .wandb file: a 7-byte file header, then LevelDB-log records in 32 KiB blocks
    (each record: crc32 4 bytes, length 2, type 1 = full, 2/3/4 = first/middle/last fragment)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, pending, offset, block = [], b"", 7, 32768
    while offset + 7 <= len(data):
        left_in_block = block - offset % block
        if left_in_block < 7:  # trailer padding
            offset += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[offset:offset + 7])
        chunk = data[offset + 7: offset + 7 + length]
        offset += 7 + length
        if kind == 0 and length == 0:
            break
        pending += chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records
