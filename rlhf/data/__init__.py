"""The data layer: sources, record formats, tokenisation, batching."""
