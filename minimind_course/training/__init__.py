"""How MiniMind-Tiny is built and measured: corpus, tokenizer, training, evaluation (``make tiny-model``)."""
