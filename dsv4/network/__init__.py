"""The DSV4 network: config, layers (attention with its compressor and indexer, MoE, mHC, norms,
rotary), the per-layer cache the layers write, and the tensor-parallel maths. Builds on formats/."""
