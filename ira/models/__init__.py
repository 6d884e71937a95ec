"""The trained models: the SpeechLM (speech_lm.py, with its delay pattern and KV cache), the voice style
encoder, the Perceiver adapter, and LLM loading. Import from the submodules directly."""
