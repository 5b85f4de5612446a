import os

# One process per engine: errors raised while the model is built reach the test as they are, and no engine
# process outlives a test. A small KV cache: the tiny models need little.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
