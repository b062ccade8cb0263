"""What every command needs at run time: progress and logs, signals, the allocator, atomic
files that never follow links, and the device (the only module here that imports torch)."""
