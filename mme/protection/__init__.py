"""Protection: make a clean set unlearnable (MEM and baselines), check it, export it."""
