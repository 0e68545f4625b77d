"""A loopback emulator of Ollama's HTTP API (v0.32.15) with model profiles, a cost model and fault injection.

It shares no code with the pipeline it is used to test (it imports nothing from `ollama_pipeline`
outside this package).
"""

from ollama_pipeline.emulator.profiles import HOSTS, MODELS, HostProfile, ModelProfile
from ollama_pipeline.emulator.server import FAULT_KINDS, VERSION, EmulatorConfig, EmulatorServer, Fault

__all__ = ["EmulatorConfig", "EmulatorServer", "Fault", "FAULT_KINDS", "HOSTS", "MODELS", "HostProfile",
           "ModelProfile", "VERSION"]
