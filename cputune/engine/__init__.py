"""The engines: building llama.cpp / ik_llama.cpp, their flags, llama-bench, placement, bench, tune, serve and RPC workers."""
