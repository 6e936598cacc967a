from dsv4.loading.checkpoint import CheckpointError, load_model, save_checkpoint
from dsv4.network.cache import ModelCache
from dsv4.network.config import LayerSpec, ModelConfig
from dsv4.network.model import Transformer
from dsv4.network.options import ForwardOptions
from dsv4.runtime.engine import Engine, EngineMemory
from dsv4.runtime.errors import (
                         ContextLengthExceeded,
                         DeadlineExceeded,
                         EngineBusy,
                         EngineError,
                         KVBudgetExceeded,
                         SessionFormatError,
                         SessionMismatch,
                         SessionStateError,
)
from dsv4.runtime.options import RuntimeOptions
from dsv4.runtime.sampling import SamplingParams
from dsv4.runtime.scheduler import StepRecord
from dsv4.runtime.session import Session, SessionMemory
