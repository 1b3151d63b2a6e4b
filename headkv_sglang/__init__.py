"""headkv-sglang: head-level KV-cache compression served inside SGLang."""

__version__ = "0.1.0"
