"""The real model: loading, the Llama-family decoder, paged attention, sampling, the executor."""
