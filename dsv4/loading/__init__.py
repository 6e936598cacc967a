"""Checkpoints: reading and writing the official layout (`checkpoint`, which builds the network),
tensor-parallel sharding of its tensors (`sharding`), sizes (`sizes`) and random test checkpoints
(`testing`). Builds on network/."""
