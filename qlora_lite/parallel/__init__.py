"""Several processes: process groups, DDP gradient sums, FSDP2 sharding of the 4-bit base."""
