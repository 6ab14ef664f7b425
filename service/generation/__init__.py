"""Text generation: tokenizers, sampling and the continuous-batching engine."""
