from dsv4.config import LayerSpec, ModelConfig
from dsv4.checkpoint import CheckpointError, load_model, save_checkpoint
