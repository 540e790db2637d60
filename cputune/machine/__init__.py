"""The box: topology, memory, bandwidth, the probe and its findings."""
