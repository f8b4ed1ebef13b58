"""Protection methods: one unit per file (pgd, hotflip, triggers, augment, store, mem)."""
