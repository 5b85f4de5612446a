"""Model integrations: DPVR-LF for Hugging Face LLaVA (llava.py) and its varlen attention (attention.py)."""
