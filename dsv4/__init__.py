from dsv4.config import LayerSpec, ModelConfig
from dsv4.model import Transformer
from dsv4.cache import ModelCache
from dsv4.checkpoint import CheckpointError, load_model, save_checkpoint
from dsv4.engine import Engine, EngineMemory
from dsv4.errors import (ContextLengthExceeded, EngineError, KVBudgetExceeded, SessionFormatError,
                         SessionMismatch, SessionStateError)
from dsv4.sampling import SamplingParams
from dsv4.session import Session, SessionMemory
