#!/usr/bin/env python3
"""The reference uploader bench/aws.sh compares fluidcloud with: a raw disk
image into an EBS snapshot through the EBS direct APIs, with boto3.

It does what a careful Python user would: reads only the allocated ranges
(SEEK_DATA/SEEK_HOLE), skips all-zero blocks, puts 512 KiB blocks with
their SHA-256 checksums from THREADS threads, and completes the snapshot
with the count of changed blocks.

    boto3_snapshot_upload.py IMAGE ENDPOINT_URL REGION THREADS

Prints the snapshot id and the blocks sent, as JSON.
"""
import base64
import concurrent.futures
import hashlib
import json
import os
import sys

import boto3

BLOCK = 512 * 1024


def allocated(fd, size):
    """(start, end) of each allocated range, block-aligned."""
    off = 0
    while off < size:
        try:
            data = os.lseek(fd, off, os.SEEK_DATA)
        except OSError:
            return
        hole = os.lseek(fd, data, os.SEEK_HOLE)
        yield data - data % BLOCK, min(size, -(-hole // BLOCK) * BLOCK)
        off = hole


def main():
    image, endpoint, region, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    ebs = boto3.client("ebs", endpoint_url=endpoint, region_name=region)
    size = os.path.getsize(image)
    gib = -(-size // (1 << 30))
    snap = ebs.start_snapshot(VolumeSize=gib, Description="boto3 reference upload")["SnapshotId"]
    fd = os.open(image, os.O_RDONLY)
    zero = bytes(BLOCK)

    def put(index):
        data = os.pread(fd, BLOCK, index * BLOCK)
        if len(data) < BLOCK:
            data += bytes(BLOCK - len(data))
        if data == zero:
            return 0
        checksum = base64.b64encode(hashlib.sha256(data).digest()).decode()
        ebs.put_snapshot_block(SnapshotId=snap, BlockIndex=index, BlockData=data,
                               DataLength=BLOCK, Checksum=checksum, ChecksumAlgorithm="SHA256")
        return 1

    indices = [i for start, end in allocated(fd, size) for i in range(start // BLOCK, end // BLOCK)]
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        sent = sum(pool.map(put, indices))
    ebs.complete_snapshot(SnapshotId=snap, ChangedBlocksCount=sent)
    print(json.dumps({"snapshot": snap, "blocks": sent}))


if __name__ == "__main__":
    main()
