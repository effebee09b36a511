"""The contract below both sides: adapter layout, seeds and directions, the
messages, the replicated state and its optimizer, batch sampling, GGUF files.

Pure Python and numpy: no sockets, no llama.cpp, no command line, so the
device and the server agree on it bit for bit (import-linter checks).
"""
