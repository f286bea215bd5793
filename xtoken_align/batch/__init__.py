"""Stage 3, training batches: the CONTRACTS §2 tensors from raw samples (`collate`) or from
precomputed, sharded alignments (`alignment_artifacts`)."""
