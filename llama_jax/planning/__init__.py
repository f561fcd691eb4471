"""Planning: the memory planner and every program compiled for TPU and GPU targets, no hardware."""
