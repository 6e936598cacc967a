"""Storage formats at the bottom of the package: the FP8 / FP4 codecs of the release checkpoints
(`quant`), the quantisation the model simulates (`fakequant`), append-only rows (`rows`) and the
quantised KV row layouts (`kv_fp8`). Imports torch only."""
