"""moto's server, taught one thing moto does not model: what an EBS volume
holds. moto keeps the blocks of snapshots made through the EBS direct APIs
only; a volume created from such a snapshot holds nothing, and a snapshot
taken of that volume (EC2 CreateSnapshot) has no blocks to read. On AWS
that snapshot holds what the volume holds: the blocks it was created from
plus what its instance wrote. moto runs no guest, so nothing is written:
here the snapshot of a volume gets the blocks of the snapshot the volume
came from. Nothing else of moto changes. Started by scripts/aws."""

import sys

from moto.ebs.models import EBSSnapshot, ebs_backends
from moto.ec2.models import EC2Backend

_create_snapshot = EC2Backend.create_snapshot


def create_snapshot(self, volume_id, description, owner_id=None, from_ami=None):
    snapshot = _create_snapshot(self, volume_id, description, owner_id, from_ami)
    source_id = getattr(snapshot.volume, "snapshot_id", None)
    ebs = ebs_backends[self.account_id][self.region_name]
    if snapshot.id in ebs.snapshots or from_ami:
        return snapshot
    source = ebs.snapshots.get(source_id) if source_id else None
    copy = EBSSnapshot(account_id=self.account_id, snapshot=snapshot)
    # A volume no snapshot filled and no guest wrote reads as zeros.
    copy.blocks = dict(source.blocks) if source is not None else {}
    copy.status = "completed"
    ebs.snapshots[snapshot.id] = copy
    return snapshot


EC2Backend.create_snapshot = create_snapshot

if __name__ == "__main__":
    from moto.server import main

    sys.exit(main(sys.argv[1:]))
