"""The torch reference: exact gradients of the same INT4 model, and the
profiler that ranks trainable sets with them.  Needs the [torch] extra; no
device ever imports it."""
