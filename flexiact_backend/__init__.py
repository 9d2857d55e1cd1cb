"""FlexiAct backend: FlexiAct attention on diffusers' CogVideoX, action extraction, generation and the HTTP service."""

__version__ = "0.1.0"
