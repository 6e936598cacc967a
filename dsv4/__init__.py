from dsv4.config import LayerSpec, ModelConfig
