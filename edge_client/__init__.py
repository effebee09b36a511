"""The device: joins an aggregator, scores seeds on its private data through
the runtime's engine, and replays each round's update.  Never imports torch,
and never the server's code (import-linter checks both)."""
