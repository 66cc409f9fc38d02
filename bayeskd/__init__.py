"""bayeskd: Bayesian estimation of a black-box LLM teacher's token distributions, and distillation from them."""
from bayeskd.sparse import CacheMismatchError, ShardReader, ShardWriter, SparseDist, tokenizer_fingerprint

__all__ = ["SparseDist", "ShardWriter", "ShardReader", "CacheMismatchError", "tokenizer_fingerprint"]
__version__ = "0.1.0"
