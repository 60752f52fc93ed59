"""r1tune: fine-tune DeepSeek-R1-family and other causal language models from one YAML file."""

__version__ = "0.1.0"
