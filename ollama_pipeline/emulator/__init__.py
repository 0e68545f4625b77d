"""A loopback emulator of Ollama's HTTP API, with a capacity model and fault injection.

It shares no code with the pipeline it is used to test (it imports nothing from `ollama_pipeline`
outside this package) and uses the standard library only.
"""

from ollama_pipeline.emulator.server import FAULT_KINDS, EmulatorConfig, EmulatorServer, Fault

__all__ = ["EmulatorConfig", "EmulatorServer", "Fault", "FAULT_KINDS"]
