"""The ground floor: errors, checks, units, data files, atomic writes, JSON, sysfs, statistics, core families, the NUMA rule, subprocess launching."""
