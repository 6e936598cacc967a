from dsv4.config import LayerSpec, ModelConfig
from dsv4.model import Transformer
from dsv4.cache import ModelCache
from dsv4.checkpoint import CheckpointError, load_model, save_checkpoint
