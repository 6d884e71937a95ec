"""The quality figures a user can trust: speech intelligibility (an offline ASR's word error rate on held-out
sentences, next to the codec's own ceiling). Evaluation only: models and inference never import it."""
