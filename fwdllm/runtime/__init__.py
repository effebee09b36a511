"""What the device and the server's evaluation share at run time: the
llama.cpp engine, scoring sessions, tasks and their data, the model store,
and the CURVE transport."""
